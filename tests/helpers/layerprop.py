"""The layer property check: four unpackings of one image must agree, case by case.

Owns ``check_cases``: for random cases (``tests.helpers.layergen``) it compares,
path by path and field by field (``treecmp.FIELDS``), what these show of the
same source image:

- ``fuse``: ``rafs convert``, then ``rafs mount --mode fuse``;
- ``kernel``: the same image with ``rafs mount --mode kernel`` (EROFS);
- ``eager``: ``runtime.unpack`` (what ``rafs run`` does with a plain image);
- ``umoci``: ``umoci raw unpack``, the reference.

To keep mounts few, the cases go side by side into one image, each below its
own ``cK/`` (``layergen.prefixed``). A case whose meaning would change there
(a symlink's ``..`` that stops at the root would climb out of ``cK/``: the
layer model, run on the case alone and below ``cK/``, gives different trees)
gets an image of its own. A case the layer model refuses must be refused by
``convert``, by the eager unpack and by umoci, each on the case alone.

Directory mtimes are compared among the rafs trees but not with umoci: umoci
gives implied directories the time of the unpack (README, "Differences from
umoci"). Every other field must be equal everywhere.
"""

from __future__ import annotations

import copy
import io
import random
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from converter.convert import ConvertOptions, convert
from converter.layermodel import Layer, new_root
from converter.tarstream import Entry as TarEntry
from converter.tarstream import LayerStream
from rafs.errors import RafsError
from rafs.model import Node
from runtime.image import resolve_image
from runtime.unpack import unpack_into
from tests.helpers.layergen import Case, describe, prefixed, random_case
from tests.helpers.mounts import mounted
from tests.helpers.ocibuild import Entry, build_oci_image, layer_tar
from tests.helpers.treecmp import FIELDS, Record, walk_tree
from tests.helpers.umoci import umoci_unpack

__all__ = ["Outcome", "cases_from_seeds", "check_cases"]

TAG = "t"
MODES = ("fuse", "kernel")
KEEP_REFUSALS = 5  # every fifth case as drawn; the others without the entries refused
# A file with data at the root of every image, last (no whiteout of the case can hide
# it): `rafs mount --mode kernel` of an image without any blob hangs (fused/daemon.py
# stats its own blob mount from the thread that serves it).
SENTINEL = b".rafs-property-sentinel"


@dataclass
class Outcome:
    """What one ``check_cases`` run did and found."""

    cases: int = 0
    batched: int = 0  # checked side by side in one image
    alone: int = 0  # checked in an image of their own
    refused: int = 0  # refused by every unpacker
    images: int = 0  # images converted and mounted
    differences: list[str] = field(default_factory=list)


def check_cases(cases: Sequence[Case], work: Path, label: str = "case",
                modes: Sequence[str] = MODES) -> Outcome:
    """Check every case; ``label`` names them in the differences (``label K``)."""
    out = Outcome(cases=len(cases))
    batch: list[tuple[str, bytes, Case]] = []
    alone: list[tuple[str, Case]] = []
    for k, case in enumerate(cases):
        if k % KEEP_REFUSALS:
            case = without_refused_entries(case)
        name = f"{label} {k}"
        prefix = f"c{k}".encode()
        shape = _model_shape(case)
        if isinstance(shape, str):
            out.refused += 1
            out.differences += _check_refused(work / f"refused{k}", name, case, shape)
        elif _model_shape(prefixed(case, prefix), prefix) == shape:
            batch.append((name, prefix, prefixed(case, prefix)))
        else:
            alone.append((name, case))
    if batch:
        out.batched = len(batch)
        out.images += 1
        out.differences += _check_image(work / "batch", batch, modes)
    for k, (name, case) in enumerate(alone):
        out.alone += 1
        out.images += 1
        out.differences += _check_image(work / f"alone{k}", [(name, b"", case)], modes)
    return out


# -- the layer model alone ------------------------------------------------------------


def _entry(e: Entry) -> TarEntry:
    """``e`` as the converter reads it from a layer."""
    return next(LayerStream(io.BytesIO(layer_tar([e])), what="entry").entries())


def without_refused_entries(case: Case) -> Case:
    """``case`` without the entries the layer model refuses (most random cases have
    one: a hardlink to a removed file, a file below a file, a symlink loop)."""
    root, kept = new_root(), []
    for i, entries in enumerate(case):
        layer, out = Layer(root, f"layer {i}"), []
        for e in entries:
            trial_root, trial = copy.deepcopy((root, layer))
            try:
                trial.apply(_entry(e))
            except RafsError:
                continue
            root, layer = trial_root, trial
            out.append(e)
        kept.append(out)
    return kept


def _model_shape(case: Case, prefix: bytes = b"") -> dict[bytes, tuple[object, ...]] | str:
    """The model's tree of ``case`` (below ``prefix``), or why the model refuses it."""
    root = new_root()
    try:
        for i, entries in enumerate(case):
            layer = Layer(root, f"layer {i}")
            for entry in LayerStream(io.BytesIO(layer_tar(entries)), what=f"layer {i}").entries():
                layer.apply(entry)
    except RafsError as e:
        return str(e)
    if prefix:
        assert root.children is not None
        root = root.children.get(prefix, new_root())
    shape: dict[bytes, tuple[object, ...]] = {}
    first_name: dict[int, bytes] = {}
    stack: list[tuple[bytes, Node]] = [(b".", root)]
    while stack:
        path, node = stack.pop()
        target = node.target
        if prefix and target.startswith(b"/" + prefix):
            target = target[len(prefix) + 1:] or b"/"
        group = first_name.setdefault(id(node), path)
        shape[path] = (node.mode, node.uid, node.gid, node.mtime, node.size, node.rdev,
                       target, sorted(node.xattrs.items()), group)
        for name, child in (node.children or {}).items():
            stack.append((name if path == b"." else path + b"/" + name, child))
    return shape


# -- refusals -------------------------------------------------------------------------


def _check_refused(work: Path, name: str, case: Case, why: str) -> list[str]:
    """The model refuses ``case``: so must convert, the eager unpack and umoci."""
    src = work / "src"
    build_oci_image(src, TAG, case, compression="none")
    found = []
    try:
        convert(f"oci:{src}:{TAG}", f"oci:{work / 'rafs'}:{TAG}", _OPTIONS)
        found.append("rafs convert accepts it")
    except RafsError:
        pass
    (work / "eager").mkdir()
    try:
        unpack_into(resolve_image(f"oci:{src}:{TAG}"), work / "eager")
        found.append("the eager unpack accepts it")
    except RafsError:
        pass
    try:
        umoci_unpack(src, TAG, work / "umoci")
        found.append("umoci accepts it")
    except (AssertionError, subprocess.CalledProcessError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    if not found:
        return []
    return [f"{name}: the layer model refuses it ({why}), but {', '.join(found)}:\n"
            f"{describe(case)}"]


# -- one image, four trees ------------------------------------------------------------


_OPTIONS = ConvertOptions(chunk_size=4096, progress=False, workers=0)


def _check_image(work: Path, cases: list[tuple[str, bytes, Case]],
                 modes: Sequence[str]) -> list[str]:
    layers: Case = []
    for _, _, case in cases:
        for i, entries in enumerate(case):
            while len(layers) <= i:
                layers.append([])
            layers[i] += entries
    layers[-1].append(Entry(SENTINEL, "file", data=b"data, so that the image has a blob"))
    src, ref = work / "src", f"oci:{work / 'rafs'}:{TAG}"
    build_oci_image(src, TAG, layers, compression="gzip")
    try:
        umoci_tree = walk_tree(umoci_unpack(src, TAG, work / "umoci"))
    except (AssertionError, subprocess.CalledProcessError) as e:
        if len(cases) > 1:  # find the case umoci refuses, check the others without it
            return _split_umoci_refusal(work, cases, modes)
        shutil.rmtree(work, ignore_errors=True)
        name, _, case = cases[0]
        return [f"{name}: umoci refuses it, rafs accepts it ({e}):\n{describe(case)}"]
    try:
        convert(f"oci:{src}:{TAG}", ref, _OPTIONS)
        (work / "eager").mkdir()
        unpack_into(resolve_image(f"oci:{src}:{TAG}"), work / "eager")
    except RafsError as e:
        return [f"{name}: rafs refuses the image ({e}), the layer model alone does not:\n"
                f"{describe(case)}" for name, _, case in cases]
    trees = {"umoci": umoci_tree, "eager": walk_tree(work / "eager")}
    for mode in modes:
        with mounted(ref, work / f"mnt-{mode}", work / f"cache-{mode}", mode=mode) as mnt:
            trees[mode] = walk_tree(mnt)
    diffs = []
    for name, prefix, case in cases:
        found = _compare({t: _below(records, prefix) for t, records in trees.items()})
        if found:
            diffs.append(f"{name}:\n" + "\n".join(f"  {d}" for d in found[:40])
                         + f"\n{describe(case)}")
    shutil.rmtree(work, ignore_errors=True)
    return diffs


def _split_umoci_refusal(work: Path, cases: list[tuple[str, bytes, Case]],
                         modes: Sequence[str]) -> list[str]:
    shutil.rmtree(work, ignore_errors=True)
    diffs, kept = [], []
    for k, (name, prefix, case) in enumerate(cases):
        src = work / f"one{k}"
        build_oci_image(src, TAG, case, compression="none")
        try:
            umoci_unpack(src, TAG, work / f"one{k}-umoci")
            kept.append((name, prefix, case))
        except (AssertionError, subprocess.CalledProcessError) as e:
            diffs.append(f"{name}: umoci refuses it, rafs accepts it ({e}):\n{describe(case)}")
    shutil.rmtree(work, ignore_errors=True)
    if kept and len(kept) < len(cases):
        diffs += _check_image(work, kept, modes)
    return diffs


def _below(records: dict[bytes, Record], prefix: bytes) -> dict[bytes, Record]:
    """The records of one case: those below ``prefix``, with their paths kept (so
    that hardlink groups compare as they are); alone, all but the unpack root."""
    if not prefix:
        return {p: r for p, r in records.items() if p not in (b".", SENTINEL)}
    return {p: r for p, r in records.items() if p == prefix or p.startswith(prefix + b"/")}


def _compare(trees: dict[str, dict[bytes, Record]]) -> list[str]:
    names = list(trees)
    diffs = []
    for path in sorted(set().union(*trees.values())):
        present = [t for t in names if path in trees[t]]
        if len(present) < len(names):
            diffs.append(f"{path!r}: only in {', '.join(present)}")
            continue
        for f in FIELDS:
            values = {t: trees[t][path].get(f) for t in names}
            if f == "mtime" and trees["umoci"][path]["type"] == "dir":
                values.pop("umoci")  # umoci: implied directories get the unpack time
            if len({repr(v) for v in values.values()}) > 1:
                diffs.append(f"{path!r} {f}: " + ", ".join(
                    f"{t}={_fmt(f, v)}" for t, v in values.items()))
    return diffs


def _fmt(name: str, value: object) -> str:
    return f"{value:o}" if name == "mode" and isinstance(value, int) else repr(value)


def cases_from_seeds(seeds: Iterable[int], per_seed: int) -> list[Case]:
    """``per_seed`` cases for each seed, the same ones on every run."""
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        out += [random_case(rng) for _ in range(per_seed)]
    return out
