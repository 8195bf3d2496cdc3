"""Publishing ``OUT/<name>`` without a gap (docs/FAULTS.md rows 20, 42 and 60-62).

Averages are folded by the real engine from tiny real safetensors checkpoints and published with
``publish_average``: a versioned folder under ``OUT/.ckptavg/versions/<name>/`` and one ``rename()``
of a new symlink ``OUT/<name>``. Readers load what was published with ``safetensors`` and
``transformers`` while the daemon-style publisher keeps replacing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file

from ckptavg import Engine, open_checkpoint
from ckptavg.oneshot import AverageSpec, build_averages
from ckptavg.writing import atomic, export
from ckptavg.writing.export import publish_average, remove_publish_orphans, versions_dir

STEPS = [100, 200, 300]
SHARD = 1500  # bytes: the tiny state is split over several shards, so a mix of two publishes shows


def _run(root: Path) -> list[Path]:
    paths = []
    for i, step in enumerate(STEPS):
        p = write_checkpoint(root / f"checkpoint-{step}", tiny_state(i, dtype=torch.float32), step=step)
        (p / "config.json").write_text(json.dumps({"model_type": "tiny", "step": step}))
        paths.append(p)
    return paths


def _folded(paths: list[Path], n: int):
    """A uniform average folded from the first ``n`` checkpoints, and the newest checkpoint."""
    ckpts = [open_checkpoint(p) for p in paths[:n]]
    avgs = build_averages([AverageSpec("uniform")])
    with Engine() as engine:
        history = {}
        for c in ckpts:
            history[c.step] = c
            engine.fold(c, avgs, ident=c.step, history=history)
    return avgs[0], ckpts[-1]


@pytest.fixture
def two_states(tmp_path):
    """Two different averages (steps 100-200 and 100-300) to publish alternately under one name."""
    paths = _run(tmp_path / "run")
    return [_folded(paths, 2), _folded(paths, 3)]


def _expected(avg) -> dict[str, torch.Tensor]:
    return {n: avg.result(n).to(avg.slots[n].dtype) for n in avg.slots}


def _weights(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def _which(tensors: dict[str, torch.Tensor], expected: dict[int, dict[str, torch.Tensor]]) -> set[int]:
    """The publishes (last step) every tensor of ``tensors`` agrees with."""
    return {k for k, want in expected.items() if all(torch.equal(t, want[n]) for n, t in tensors.items())}


class Reader(threading.Thread):
    """Loads ``OUT/<name>`` in a tight loop: the index, every shard (``safetensors.torch.load_file``),
    ``config.json`` and ``ckptavg.json``.

    ``resolve``: resolve the link once per read and read every file from that folder (a whole
    consistent model); otherwise every file is opened by its path under ``OUT/<name>``, as
    ``from_pretrained`` does.
    """

    def __init__(self, target: Path, expected: dict[int, dict[str, torch.Tensor]], *, resolve: bool) -> None:
        super().__init__(daemon=True)
        self.target, self.expected, self.resolve = target, expected, resolve
        self.stop = threading.Event()
        self.reads = 0
        self.missing: list[str] = []  # a file not found (or any other error opening one)
        self.torn: list[str] = []  # one file's tensors agree with no single publish
        self.mixed: list[str] = []  # the files of one read come from different publishes

    def read_once(self) -> None:
        folder = Path(os.path.realpath(self.target)) if self.resolve else self.target
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for f in _weights(folder):
            part = load_file(folder / f)
            which = _which(part, self.expected)
            if not which:
                self.torn.append(f)
            seen |= which if len(which) == 1 else set()
            tensors.update(part)
        steps = json.loads((folder / "ckptavg.json").read_text())["steps"]
        config = json.loads((folder / "config.json").read_text())
        seen |= {steps[-1], config["step"]}
        if len(seen) != 1 or set(tensors) != set(self.expected[steps[-1]]):
            self.mixed.append(f"{sorted(seen)}")

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.read_once()
            except (OSError, RuntimeError) as e:  # safetensors reports a missing file as RuntimeError
                self.missing.append(f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a torn file: bad JSON, a bad header
                self.torn.append(f"{type(e).__name__}: {e}")
            self.reads += 1


def test_row42_readers_never_see_a_missing_file_or_a_mixed_model(tmp_path, two_states):
    """docs/FAULTS.md rows 42 and 60: two readers load ``OUT/<name>`` in a loop through 150+ publishes that
    alternate between two different averages. Neither ever meets a missing file; every weights file
    is whole and from one publish; a reader that resolves the link once per load gets every file
    (shards, index, config, ckptavg.json) from one publish. A reader that opens each file by its path
    under ``OUT/<name>`` (as ``from_pretrained`` does) can combine files of two publishes (row 60):
    counted and printed, not asserted."""
    out = tmp_path / "out"
    target = out / "uniform"
    expected = {}
    for avg, newest in two_states:
        expected[newest.step] = _expected(avg)
    assert not torch.equal(expected[200]["embed.weight"], expected[300]["embed.weight"])
    avg, newest = two_states[0]
    publish_average(avg, target, newest=newest, max_shard_bytes=SHARD, grace=1.0)
    assert len(_weights(target)) > 1
    readers = [Reader(target, expected, resolve=False), Reader(target, expected, resolve=True)]
    for r in readers:
        r.start()
    publishes = 0
    t0 = time.monotonic()
    try:
        while publishes < 150 or time.monotonic() - t0 < 3.0:  # also long enough for old versions to expire
            avg, newest = two_states[(publishes + 1) % 2]
            publish_average(avg, target, newest=newest, max_shard_bytes=SHARD, grace=1.0)
            publishes += 1
    finally:
        for r in readers:
            r.stop.set()
            r.join(timeout=30)
    path_reader, resolved = readers
    print(f"\n{publishes} publishes; path reader: {path_reader.reads} reads, {len(path_reader.missing)} missing, "
          f"{len(path_reader.torn)} torn files, {len(path_reader.mixed)} reads mixing two publishes across files; "
          f"resolving reader: {resolved.reads} reads, {len(resolved.missing)} missing, {len(resolved.mixed)} mixed")
    assert publishes >= 150
    assert path_reader.reads > 150 and resolved.reads > 150
    assert path_reader.missing == [] and resolved.missing == [], (path_reader.missing[:3], resolved.missing[:3])
    assert path_reader.torn == [] and resolved.torn == []
    assert resolved.mixed == [], resolved.mixed[:3]
    # replaced versions went after the grace period; the published one and the young ones stay
    versions = versions_dir(target)
    kept = sorted(p.name for p in versions.iterdir())
    assert 1 <= len(kept) < publishes / 2, kept
    assert os.readlink(target) == os.path.relpath(versions / kept[-1], out)


def test_row42_from_pretrained_loads_the_published_model(tmp_path):
    """docs/FAULTS.md row 42: a tiny real Llama saved with ``save_pretrained`` at three steps, folded
    and published twice: ``from_pretrained(OUT/<name>)`` loads the newest publish each time."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    paths = []
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(config).eval()
        p = tmp_path / "run" / f"checkpoint-{step}"
        model.save_pretrained(p)
        (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        paths.append(p)
    target = tmp_path / "out" / "uniform"
    for n in (2, 3):
        avg, newest = _folded(paths, n)
        publish_average(avg, target, newest=newest, aliases=newest.aliases)
        assert target.is_symlink()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(target)
        got = loaded.state_dict()
        want = _expected(avg)
        assert set(want) <= set(got)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        assert json.loads((target / "ckptavg.json").read_text())["steps"] == STEPS[:n]


CRASH = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from ckptavg import hooks
import test_publish_swap as t
paths = t._run(Path({run!r}))
avg, newest = t._folded(paths, 2)
t.publish_average(avg, Path({target!r}), newest=newest)
avg, newest = t._folded(paths, 3)
hooks.install("publish.before-rename", lambda **_: os._exit(137))
t.publish_average(avg, Path({target!r}), newest=newest)
"""


def test_row20_kill_between_version_and_swap_keeps_the_old_model(tmp_path):
    """docs/FAULTS.md row 20: kill -9 after the new version is complete, before the swap: ``OUT/<name>``
    is still the old, whole model, and the start-up clean-up removes the half-published version."""
    target = tmp_path / "out" / "uniform"
    script = CRASH.format(tests=str(Path(__file__).parent), run=str(tmp_path / "run"), target=str(target))
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    paths = sorted((tmp_path / "run").iterdir())
    old_avg, _ = _folded(paths, 2)
    new_avg, _ = _folded(paths, 3)
    got = load_file(target / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in _expected(old_avg).items())  # old and whole
    assert json.loads((target / "ckptavg.json").read_text())["steps"] == [100, 200]
    versions = versions_dir(target)
    assert sorted(p.name for p in versions.iterdir()) == ["v000001-step200", "v000002-step300"]
    assert load_file(versions / "v000002-step300" / "model.safetensors").keys() == _expected(new_avg).keys()
    removed = remove_publish_orphans(target.parent, grace=600)  # what the daemon runs at start
    assert removed == [versions / "v000002-step300"]
    assert sorted(p.name for p in versions.iterdir()) == ["v000001-step200"]
    assert json.loads((target / "ckptavg.json").read_text())["steps"] == [100, 200]


def test_row61_start_up_clean_up_removes_every_orphan_and_never_a_linked_version(tmp_path, two_states):
    """docs/FAULTS.md row 61: debris of interrupted publishes of ``OUT/<name>`` and of ``best``: staging
    folders, a temporary link, a stale ``.ckptavg-old-`` folder, a half-built best version and an
    unlinked complete one. All go at start; what a link points to stays, however old."""
    out = tmp_path / "out"
    target = out / "uniform"
    for avg, newest in two_states:
        publish_average(avg, target, newest=newest, grace=600)
    versions = versions_dir(target)
    v1, v2 = sorted(versions.iterdir())
    old = time.time() - 3600
    os.utime(v2, (old, old))  # the linked version is old: still kept
    (versions / f".v000003-step300{atomic.TMP_MARK}123-abcd").mkdir()  # killed while building a version
    (versions / f".v000003-step300{atomic.TMP_MARK}123-abcd" / "model.safetensors").write_bytes(b"half")
    os.symlink("x", out / f".uniform{atomic.TMP_MARK}123-abcd")  # killed before the link was renamed in
    (out / ".uniform.ckptavg-old-abcd").mkdir()  # an older ckptavg killed between its two renames
    best = out / ".best-versions"
    for name in ("v0001-step100-raw", "v0002-step200-uniform", "v0003-step300-uniform"):
        (best / name).mkdir(parents=True)
        (best / name / "model.safetensors").write_bytes(b"x")
    (best / f".v0004-step400-raw{atomic.TMP_MARK}77").mkdir()  # evaluation.py's staging name
    os.symlink(Path(".best-versions") / "v0002-step200-uniform", out / "best")
    for name in ("v0001-step100-raw", "v0002-step200-uniform", "v0003-step300-uniform"):
        os.utime(best / name, (old, old))
    os.utime(out / "best", (old, old), follow_symlinks=False)
    (best / "v0005-step500-raw").mkdir()  # unlinked but young: a reader may still be in it (grace)
    removed = remove_publish_orphans(out, grace=600, best_grace=600)
    assert sorted(p.name for p in out.iterdir()) == [".best-versions", ".ckptavg", "best", "uniform"]
    assert sorted(p.name for p in versions.iterdir()) == [v1.name, v2.name]  # v1: replaced < 600 s ago
    assert sorted(p.name for p in best.iterdir()) == ["v0002-step200-uniform", "v0005-step500-raw"]
    assert {p.name for p in removed} >= {"v0001-step100-raw", "v0003-step300-uniform", ".uniform.ckptavg-old-abcd"}
    # with no grace left, only what the links point to remains
    remove_publish_orphans(out, grace=0, best_grace=0)
    assert [p.name for p in versions.iterdir()] == [v2.name]
    assert [p.name for p in best.iterdir()] == ["v0002-step200-uniform"]
    assert load_file(target / "model.safetensors").keys() == two_states[1][0].slots.keys()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_row62_migration_from_a_real_folder(tmp_path, two_states, monkeypatch, exchange):
    """docs/FAULTS.md row 62: ``OUT/<name>`` is still a real folder written by an older ckptavg. The
    first publish moves it into the versions (atomically exchanged with the new link where the
    filesystem can) and links the new version; the old folder goes after the grace period."""
    out = tmp_path / "out"
    target = out / "uniform"
    (avg_a, newest_a), (avg_b, newest_b) = two_states
    publish_average(avg_a, out / "staging", newest=newest_a)
    os.rename(os.path.realpath(out / "staging"), target)  # a real folder, as ckptavg 0.x left it
    (out / "staging").unlink()
    if not exchange:
        def unsupported(a, b):
            raise OSError(22, "Invalid argument")
        monkeypatch.setattr(atomic, "exchange_paths", unsupported)
    assert not target.is_symlink()
    publish_average(avg_b, target, newest=newest_b, grace=600)
    assert target.is_symlink()
    assert json.loads((target / "ckptavg.json").read_text())["steps"] == STEPS
    versions = versions_dir(target)
    names = sorted(p.name for p in versions.iterdir())
    assert names == ["v000000-migrated", "v000001-step300"], names
    assert json.loads((versions / "v000000-migrated" / "ckptavg.json").read_text())["steps"] == STEPS[:2]
    assert not [p for p in out.iterdir() if atomic.is_orphan(p.name)]
    publish_average(avg_a, target, newest=newest_a, grace=0)  # the migrated folder expires like any version
    assert sorted(p.name for p in versions.iterdir()) == ["v000002-step200"]


def test_row62_interrupted_migration_is_repaired_at_start(tmp_path, two_states):
    """docs/FAULTS.md row 62: without an atomic exchange, a kill between moving the old folder away and
    renaming the link in leaves no ``OUT/<name>``; the start-up clean-up links the migrated folder back."""
    out = tmp_path / "out"
    target = out / "uniform"
    avg, newest = two_states[0]
    publish_average(avg, target, newest=newest)
    versions = versions_dir(target)
    v1 = next(versions.iterdir())
    target.unlink()
    os.rename(v1, versions / "v000000-migrated")  # the old folder is moved, the link never came
    remove_publish_orphans(out, grace=600)
    assert target.is_symlink()
    assert json.loads((target / "ckptavg.json").read_text())["steps"] == STEPS[:2]


def test_publish_point_fires_after_the_version_is_complete_and_before_the_swap(tmp_path, two_states):
    """The ``publish.before-rename`` crash point sees the new version whole and ``OUT/<name>`` unchanged."""
    from ckptavg import hooks

    target = tmp_path / "out" / "uniform"
    (avg_a, newest_a), (avg_b, newest_b) = two_states
    publish_average(avg_a, target, newest=newest_a)
    seen = {}

    def look(target: Path) -> None:
        versions = sorted(p.name for p in versions_dir(target).iterdir())
        seen["versions"] = versions
        seen["steps"] = json.loads((target / "ckptavg.json").read_text())["steps"]
        seen["new"] = json.loads((versions_dir(target) / versions[-1] / "ckptavg.json").read_text())["steps"]

    hooks.install("publish.before-rename", look)
    try:
        publish_average(avg_b, target, newest=newest_b)
    finally:
        hooks.clear()
    assert seen == {"versions": ["v000001-step200", "v000002-step300"], "steps": STEPS[:2], "new": STEPS}
    assert json.loads((target / "ckptavg.json").read_text())["steps"] == STEPS


def test_publish_grace_defaults_to_a_minute_and_is_never_negative(tmp_path, two_states):
    assert export.DEFAULT_PUBLISH_GRACE == 60.0
    avg, newest = two_states[0]
    with pytest.raises(ValueError):
        publish_average(avg, tmp_path / "out" / "x", newest=newest, grace=-1)
