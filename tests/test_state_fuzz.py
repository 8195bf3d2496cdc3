"""Fuzzed daemon state (docs/FAULTS.md row 43): bit flips across the newest generation never change a number and
never stop the daemon while the previous generation is intact; with both kept generations damaged it refuses in
one line."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from test_daemon import assert_same, one_shot, start_daemon, status, stop, wait_for, write_trainer_checkpoint

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3, 4, 5)


def _folded_to(out: Path, daemon, step: int):
    return lambda: (status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == step
                    and status(out).get("state") == "watching")


def _generation_files(state: Path, gen: int) -> list[Path]:
    return [state / f"manifest-{gen}.json", state / f"accumulators-{gen}.safetensors"]


def _flip(files: list[Path], rng: random.Random, n: int) -> list[tuple[str, int, int]]:
    """Flip ``n`` random bits across ``files`` taken as one byte string; returns (file, byte, bit) of each."""
    sizes = [f.stat().st_size for f in files]
    flips = []
    for _ in range(n):
        pos, bit = rng.randrange(sum(sizes)), rng.randrange(8)
        for f, size in zip(files, sizes):
            if pos < size:
                data = bytearray(f.read_bytes())
                data[pos] ^= 1 << bit
                f.write_bytes(bytes(data))
                flips.append((f.name, pos, bit))
                break
            pos -= size
    return flips


@pytest.fixture(scope="module")
def folded_base(tmp_path_factory):
    """A run of checkpoints 100-400 and a daemon output (state included) that folded all four, then stopped."""
    base = tmp_path_factory.mktemp("fuzz-base")
    run, out = base / "run", base / "avg"
    for i, step in enumerate((100, 200, 300, 400)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out)
    try:
        assert wait_for(_folded_to(out, daemon, 400), 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    gens = sorted(int(p.stem.split("-")[1]) for p in (out / ".ckptavg").glob("manifest-*.json"))
    assert len(gens) == 4  # keep_generations = 4: the newest and three fallbacks (rollbacks need them)
    return base, gens


@pytest.mark.parametrize("seed", SEEDS)
def test_row43_daemon_survives_bit_flips_in_the_newest_generation(tmp_path, folded_base, seed):
    """docs/FAULTS.md row 43: flip 1-8 seeded random bits across the newest generation (manifest and accumulator
    file as one byte string), add a checkpoint, restart: the daemon starts, warns once that it fell back, folds
    again what the damaged generation held and the new checkpoint, and publishes exactly the one-shot's bits."""
    base, gens = folded_base
    previous, newest = gens[-2:]
    run, out = tmp_path / "run", tmp_path / "avg"
    shutil.copytree(base / "run", run)
    shutil.copytree(base / "avg", out)
    rng = random.Random(seed)
    flips = _flip(_generation_files(out / ".ckptavg", newest), rng, rng.randint(1, 8))
    write_trainer_checkpoint(run, 500, 4)
    daemon = start_daemon(run, out)
    try:
        done = _folded_to(out, daemon, 500)
        assert wait_for(lambda: done() or status(out).get("skipped"), 60), (flips, status(out), daemon.poll())
    finally:
        code, err = stop(daemon)
    assert code == 0 and "Traceback" not in err, (flips, err)
    assert status(out)["skipped"] == [], (flips, status(out)["last_error"])
    assert err.count(f"state generation {newest} is unusable") == 1, (flips, err)
    assert err.count(f"resumed from generation {previous}") == 1, (flips, err)
    assert "folded step 400" in err and "folded step 500" in err  # the lost fold is redone, the new one done
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


def test_row43_daemon_refuses_when_every_kept_generation_is_damaged(tmp_path, folded_base):
    """docs/FAULTS.md row 43: with every kept generation damaged there is nothing to trust: the daemon exits 1
    with one line naming them, never a traceback, and never restarts the averages empty."""
    base, gens = folded_base
    previous, newest = gens[-2:]
    run, out = tmp_path / "run", tmp_path / "avg"
    shutil.copytree(base / "run", run)
    shutil.copytree(base / "avg", out)
    rng = random.Random(43)
    for gen in gens:
        _flip(_generation_files(out / ".ckptavg", gen), rng, 3)
    daemon = start_daemon(run, out)
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("ckptavg: error:")]
    assert len(errors) == 1 and "no saved generation verifies" in errors[0], err
    assert f"generation {newest} is unusable" in errors[0] and f"generation {previous} is unusable" in errors[0]
    assert sorted(p.name for p in (out / ".ckptavg").glob("manifest-*.json")) == [
        f"manifest-{g}.json" for g in gens]  # nothing reset, nothing removed
