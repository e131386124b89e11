"""Read a whole mounted tree the way a container would, reporting every answer.

Run as ``python -m tests.helpers.treeread ROOT``: walks ``ROOT`` (lstat every
entry, list and read every xattr, readlink every symlink, read every regular
file to its end in 128 KiB reads) and prints one JSON line per entry as soon
as it is done (so a caller that kills a hung reader keeps what came before):
``{"path": HEX, "type": "reg"|"dir"|"lnk"|"other", "data": HEX-SHA256 of the
bytes read, "read": N, "errno": E}`` (``errno`` only when something failed,
``target`` for symlinks). Independent of rafs on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys

BLOCK = 128 << 10


def _entry(path: bytes) -> dict[str, object]:
    out: dict[str, object] = {"path": path.hex()}
    try:
        st = os.lstat(path)
    except OSError as e:
        out["errno"] = e.errno
        return out
    mode = st.st_mode
    out["type"] = ("reg" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode)
                   else "lnk" if stat.S_ISLNK(mode) else "other")
    out["size"] = st.st_size
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (95,):  # EOPNOTSUPP
            out["xattr_errno"] = e.errno
    if stat.S_ISLNK(mode):
        try:
            out["target"] = os.readlink(path).hex()
        except OSError as e:
            out["errno"] = e.errno
    elif stat.S_ISREG(mode):
        digest, n = hashlib.sha256(), 0
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                while data := os.read(fd, BLOCK):
                    digest.update(data)
                    n += len(data)
            finally:
                os.close(fd)
        except OSError as e:
            out["errno"] = e.errno
        out["data"], out["read"] = digest.hexdigest(), n
    return out


def walk(root: bytes) -> None:
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            names = sorted(os.listdir(top))
        except OSError as e:
            print(json.dumps({"path": top.hex(), "type": "dir", "errno": e.errno}), flush=True)
            continue
        for name in names:
            path = os.path.join(top, name)
            rec = _entry(path)
            print(json.dumps(rec), flush=True)
            if rec.get("type") == "dir" and "errno" not in rec:
                stack.append(path)


if __name__ == "__main__":
    walk(os.fsencode(sys.argv[1]))
