"""The daemon's config: the shipped example loads; every mistake names its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptavg.daemon.config import config_from_flags, load_config
from ckptavg.errors import UsageError

EXAMPLE = Path(__file__).parent.parent / "systemd" / "exp1.toml"


def test_example_config_loads_with_every_key():
    cfg = load_config(EXAMPLE)
    assert [a.name for a in cfg.averages] == ["ema-2000", "lawa-5", "swa-late"]
    assert cfg.averages[0].options == {"half_life": 2000} and str(cfg.averages[0].rules[0]) == "*.norm.*=half-life:500"
    assert cfg.state_path == Path("/srv/runs/exp1-avg/.ckptavg") and cfg.poll == "auto" and cfg.marker is None
    text = EXAMPLE.read_text()
    for key in ("watch", "output", "state_dir", "device", "accum_dtype", "publish_every", "persist_every", "poll",
                "poll_interval", "settle", "marker", "on_shape_change", "keep_for_lawa", "deepspeed_weights", "nice",
                "ionice_idle", "threads", "rules", "memory_budget"):
        assert f"\n{key} = " in text, key  # every top-level key is shown (and commented) in the example
    ev = cfg.evaluate
    assert (ev.kind, ev.metric, ev.mode, ev.every, ev.raw) == ("command", "val_loss", "min", 1, True)
    assert ev.options == {"command": "python /srv/eval/eval.py --model {model_dir}", "timeout": 3600.0,
                          "pass_hub_token": False}
    for key in ("kind", "command", "timeout", "function", "data", "seq_len", "batch_size", "max_tokens", "tokenizer",
                "device", "dtype", "text_field", "metric", "mode", "every", "raw", "best_grace", "repo", "revision",
                "private", "endpoint"):
        assert f"{key} = " in text, key
    assert cfg.hub is None  # the [hub] example is commented out: pushing needs a repo and a token


def test_flags_build_named_averages():
    cfg = config_from_flags("runs/exp1", "runs/exp1-avg", [{"method": "ema", "half_life": 2000.0},
                      {"method": "lawa", "window": 5}, {"method": "swa", "start_step": 6000}], settle=1.0)
    assert [a.name for a in cfg.averages] == ["ema-2000", "lawa-5", "swa-6000"] and cfg.settle == 1.0


@pytest.mark.parametrize("text,needle", [
    ('watch="a"\noutput="b"\nbogus=1\n[[average]]\nmethod="ema"\nhalf_life=5', "bogus: unknown key"),
    ('watch="a"\noutput="b"\nsettle="soon"\n[[average]]\nmethod="ema"\nhalf_life=5', "settle: expected float"),
    ('watch="a"\noutput="b"\n[[average]]\nmethod="ema"', "average[0]: method ema needs exactly one of half_life or decay"),
    ('watch="a"\noutput="b"\n[[average]]\nmethod="lawa"\nwindow=3\nhalf_life=2', "average[0].half_life: unknown key"),
    ('watch="a"\noutput="b"\n[[average]]\nmethod="polyak"', "average[0].method: expected one of"),
    ('watch="a"\noutput="a/avg"\n[[average]]\nmethod="uniform"', "inside the watched folder"),
    ('watch="o/run"\noutput="o"\n[[average]]\nmethod="uniform"', "contains the watched folder"),
    ('watch="a"\noutput="b"\n[[average]]\nmethod="lawa"\nwindow=2\n[[average]]\nmethod="lawa"\nwindow=2', "named 'lawa-2'"),
    ('watch="a"\noutput="b"\npoll="sometimes"\n[[average]]\nmethod="uniform"', "poll: expected one of"),
    ('watch="a"\noutput="b"\nrules=["x"]\n[[average]]\nmethod="uniform"', "rules: must be GLOB=ACTION with ACTION one of"),
    ('watch="a"\noutput="b"', "at least one [[average]]"),
    ('watch = [', "not valid TOML"),
])
def test_mistakes_name_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UsageError) as e:
        load_config(f)
    assert needle in str(e.value) and str(f) in str(e.value)
