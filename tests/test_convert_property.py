"""Random layer stacks: the lazy tree (fuse and kernel mode), the eager tree and umoci agree.

``tests.helpers.layergen`` draws stacks of layers over a tiny namespace, so that
entries collide often: files, directories, symlinks to anywhere (also as parent
directories), hardlinks (also into lower layers), whiteouts, opaque whiteouts,
a directory replaced by a file and back, devices, non-UTF-8 names.
``tests.helpers.layerprop`` converts them (side by side, a few dozen per image),
mounts the result in fuse mode and in kernel mode, unpacks the source eagerly
as ``rafs run`` does and with ``umoci raw unpack``, and compares the four trees
field by field; what the layer model refuses, all three must refuse.

The seeds are fixed, so every run checks the same cases; ``python -m
bench.layers_property --examples 5000`` runs thousands more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.layerprop import cases_from_seeds, check_cases

pytestmark = [pytest.mark.root]

SEEDS = range(8)
PER_IMAGE = 40  # 8 x 40 = 320 cases, about one image and two mounts per seed


@pytest.mark.parametrize("seed", SEEDS)
def test_random_layer_stacks_look_the_same_in_every_tree(tmp_path: Path, seed: int) -> None:
    out = check_cases(cases_from_seeds([seed], PER_IMAGE), tmp_path, f"seed {seed} case")
    assert out.batched > PER_IMAGE // 2, out  # the check is mostly of cases, not refusals
    assert not out.differences, "\n".join(out.differences)
