"""The ``hf-perplexity`` evaluator on a tiny real causal LM, and BatchNorm recalibration.

The model is a 2-layer GPT-2 built from a config and the tokenizer a WordLevel vocabulary trained
on the test text with the ``tokenizers`` library; both are written with ``save_pretrained`` into
``tmp_path`` (nothing is downloaded). Losses are checked against a hand-written loop that uses
transformers' own ``labels=`` loss, and ``update_bn`` against ``torch.optim.swa_utils.update_bn``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError
from ckptavg.evaluators.bn import update_bn, with_bn_recalibration
from ckptavg.evaluators.hf_perplexity import HFPerplexity

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one CPU thread

HAS_CUDA = torch.cuda.is_available()

# -- builders: a tiny causal LM and its tokenizer, saved as a trainer saves them --------------------

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "rug", "big", "small", "red", "blue", "and",
         "then", ",", ".", "!", "why", "how", "when", "who", "it", "is", "was", "very", "quite", "one", "two"]


def make_text(n_words: int = 1500, seed: int = 0) -> str:
    """Deterministic pseudo-text over a small vocabulary, with newlines."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n_words, 12)) + "\n"


def build_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained on ``text`` ([UNK]=0, [EOS]=1), as a transformers fast tokenizer."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def build_model(vocab_size: int, seed: int, *, n_positions: int = 128) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 with tied embeddings; ``seed`` picks the weights."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                        bos_token_id=1, eos_token_id=1, tie_word_embeddings=True)
    return GPT2LMHeadModel(config).eval()


def save_candidate(folder: Path, seed: int, tokenizer: PreTrainedTokenizerFast | None, **kw) -> Path:
    """``save_pretrained`` a model (and the tokenizer, when given) into ``folder``."""
    model = build_model(len(tokenizer) if tokenizer is not None else 64, seed, **kw)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text() -> str:
    return make_text()


@pytest.fixture(scope="module")
def tokenizer(text: str) -> PreTrainedTokenizerFast:
    return build_tokenizer(text)


@pytest.fixture
def txt_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "valid.txt"
    path.write_text(text)
    return path


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    return save_candidate(tmp_path / "cand-a", 1, tokenizer)


def cand(folder: Path, name: str = "raw", step: int = 100) -> Candidate:
    return Candidate(name=name, step=step, model_dir=folder, kind="raw" if name == "raw" else "average")


def reference(model_dir: Path, tokenizer, docs: list[str], seq_len: int, max_tokens: int) -> tuple[float, int]:
    """Hand-written: concatenate each document's ids, cut blocks, transformers' own mean loss per block."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"]
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(len(ids) // seq_len):
            x = torch.tensor(ids[b * seq_len:(b + 1) * seq_len])[None]
            total += model(input_ids=x, labels=x).loss.item() * (seq_len - 1)
            count += seq_len - 1
    return total / count, count


# -- hf-perplexity: numbers -------------------------------------------------------------------------

def test_txt_loss_matches_a_hand_written_loop(model_dir, txt_file, text, tokenizer):
    ev = HFPerplexity(txt_file, batch_size=3, seq_len=32)  # 3 does not divide the number of blocks
    got = ev.evaluate(cand(model_dir))
    ev.close()
    want_loss, want_tokens = reference(model_dir, tokenizer, [text], 32, 65536)
    assert set(got) == {"val_loss", "val_ppl", "val_tokens"}
    assert len(tokenizer(text)["input_ids"]) // 32 % 3 != 0
    assert got["val_tokens"] == want_tokens
    assert got["val_loss"] == pytest.approx(want_loss, abs=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(got["val_loss"]), rel=1e-12)
    assert 1.0 < got["val_loss"] < 10.0  # an untrained model: about ln(vocab)


def test_jsonl_documents_are_concatenated(tmp_path, model_dir, tokenizer):
    docs = [make_text(200, seed=s) for s in range(4)]
    path = tmp_path / "valid.jsonl"
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line is skipped
    got = HFPerplexity(path, seq_len=24, text_field="body").evaluate(cand(model_dir))
    want_loss, want_tokens = reference(model_dir, tokenizer, docs, 24, 65536)
    assert got["val_tokens"] == want_tokens
    assert got["val_loss"] == pytest.approx(want_loss, abs=1e-5)


def test_max_tokens_limits_the_tokens_scored(model_dir, txt_file, text, tokenizer):
    got = HFPerplexity(txt_file, seq_len=16, max_tokens=100).evaluate(cand(model_dir))
    assert got["val_tokens"] == 6 * 15  # 100 tokens -> 6 whole blocks of 16, 15 predictions each
    want_loss, _ = reference(model_dir, tokenizer, [text], 16, 100)
    assert got["val_loss"] == pytest.approx(want_loss, abs=1e-5)
    full = HFPerplexity(txt_file, seq_len=16).evaluate(cand(model_dir))
    assert full["val_tokens"] > 1000
    assert full["val_loss"] != pytest.approx(got["val_loss"], abs=1e-6)


def test_tokenizer_option_folder_or_file_equals_the_candidates_own(tmp_path, model_dir, txt_file, tokenizer):
    from_folder = HFPerplexity(txt_file, seq_len=32).evaluate(cand(model_dir))
    bare = tmp_path / "bare"  # the same model, without tokenizer files
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((model_dir / f).read_bytes())
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    for source in (tok_dir, tok_dir / "tokenizer.json", str(tok_dir)):
        got = HFPerplexity(txt_file, seq_len=32, tokenizer=source).evaluate(cand(bare))
        assert got == pytest.approx(from_folder, abs=1e-6), source


def test_reusing_the_model_for_a_second_candidate_equals_a_fresh_evaluator(tmp_path, model_dir, txt_file, tokenizer,
                                                                           caplog):
    second = save_candidate(tmp_path / "cand-b", 2, tokenizer)
    ev = HFPerplexity(txt_file, seq_len=32, batch_size=4)
    first = ev.evaluate(cand(model_dir, "raw", 100))
    with caplog.at_level(logging.DEBUG, logger="ckptavg.evaluators.hf_perplexity"):
        reused = ev.evaluate(cand(second, "ema-200", 200))
    assert "loaded into the model already built" in caplog.text  # the reuse path was taken
    model = ev._model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    fresh = HFPerplexity(txt_file, seq_len=32, batch_size=4).evaluate(cand(second, "ema-200", 200))
    assert reused == pytest.approx(fresh, abs=1e-6)
    assert abs(first["val_loss"] - reused["val_loss"]) > 1e-3  # different weights, different loss
    # and back to the first weights through the same model
    assert ev.evaluate(cand(model_dir)) == pytest.approx(first, abs=1e-6)
    ev.close()
    assert ev._model is None
    assert ev.evaluate(cand(second)) == pytest.approx(fresh, abs=1e-6)  # usable again after close()
    ev.close()


def test_a_changed_head_is_evaluated_not_the_stale_tied_one(tmp_path, model_dir, txt_file, tokenizer):
    """An average whose embedding moved: with the head tied, the loss must follow the new embedding."""
    state = load_file(str(model_dir / "model.safetensors"))
    assert "lm_head.weight" not in state  # tied: saved once
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (moved / f).write_bytes((model_dir / f).read_bytes())
    state["transformer.wte.weight"] = state["transformer.wte.weight"] * 3
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    ev = HFPerplexity(txt_file, seq_len=32)
    ev.evaluate(cand(model_dir))
    reused = ev.evaluate(cand(moved, "avg"))
    fresh = HFPerplexity(txt_file, seq_len=32).evaluate(cand(moved, "avg"))
    assert reused == pytest.approx(fresh, abs=1e-6)


def test_a_candidate_stored_in_another_dtype_equals_a_fresh_evaluator(tmp_path, model_dir, txt_file):
    """Without a dtype in config.json, dtype=auto takes the files' dtypes: bf16 files need a bf16 model."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    state = load_file(str(model_dir / "model.safetensors"))
    folders = []
    for name, dtype in (("full", torch.float32), ("half", torch.bfloat16)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
        save_file({k: v.to(dtype) for k, v in state.items()}, str(folder / "model.safetensors"))
        folders.append(folder)
    ev = HFPerplexity(txt_file, seq_len=32)
    first = ev.evaluate(cand(folders[0]))
    got = ev.evaluate(cand(folders[1], "avg"))
    assert ev._model.dtype == torch.bfloat16
    fresh = HFPerplexity(txt_file, seq_len=32).evaluate(cand(folders[1], "avg"))
    assert got == pytest.approx(fresh, abs=1e-6)
    assert abs(got["val_loss"] - first["val_loss"]) > 1e-5  # computed in bf16


def test_a_candidate_missing_a_tensor_is_named(tmp_path, model_dir, txt_file):
    state = load_file(str(model_dir / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((model_dir / f).read_bytes())
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    ev = HFPerplexity(txt_file, seq_len=32)
    ev.evaluate(cand(model_dir))
    with pytest.raises(EvaluationError, match=r"missing transformer\.h\.1\.mlp\.c_fc\.weight; unexpected extra\.weight"):
        ev.evaluate(cand(broken, "lawa-3"))


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result(model_dir, txt_file):
    cpu = HFPerplexity(txt_file, seq_len=32, dtype="float32").evaluate(cand(model_dir))
    ev = HFPerplexity(txt_file, seq_len=32, dtype="float32", device="cuda")
    gpu = ev.evaluate(cand(model_dir))
    ev.close()
    assert gpu["val_tokens"] == cpu["val_tokens"]
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], abs=1e-4)


# -- hf-perplexity: errors --------------------------------------------------------------------------

def test_missing_data_file(tmp_path):
    with pytest.raises(EvaluationError, match=r"nope\.txt: hf-perplexity: the data file does not exist"):
        HFPerplexity(tmp_path / "nope.txt")


def test_unknown_data_suffix(tmp_path):
    (tmp_path / "valid.parquet").write_bytes(b"PAR1")
    with pytest.raises(UsageError, match=r"suffix '\.parquet'; expected plain text"):
        HFPerplexity(tmp_path / "valid.parquet")


@pytest.mark.parametrize("content, kind", [("  \n\n", "txt"), ("\n\n", "jsonl"), ('{"text": ""}\n', "jsonl")])
def test_empty_data(tmp_path, model_dir, content, kind):
    path = tmp_path / f"valid.{kind}"
    path.write_text(content)
    with pytest.raises(EvaluationError, match=r"valid\.(txt|jsonl): hf-perplexity: the data file is empty"):
        HFPerplexity(path).evaluate(cand(model_dir))


def test_text_shorter_than_one_block_suggests_a_smaller_seq_len(tmp_path, model_dir):
    path = tmp_path / "short.txt"
    path.write_text("the cat sat on the mat")  # 6 tokens
    with pytest.raises(EvaluationError, match=r"short\.txt: .* 6 tokens, fewer than one block of seq_len=32 "
                                              r"\(pass a smaller seq_len \(at most 6\)"):
        HFPerplexity(path, seq_len=32).evaluate(cand(model_dir))


def test_jsonl_line_without_the_field_names_the_line(tmp_path, model_dir):
    path = tmp_path / "valid.jsonl"
    path.write_text('{"text": "the cat"}\n\n{"content": "a dog"}\n')
    with pytest.raises(EvaluationError, match=r"valid\.jsonl: hf-perplexity: line 3 has no 'text' field "
                                              r"\(found keys \['content'\]\) \(set text_field="):
        HFPerplexity(path, seq_len=2).evaluate(cand(model_dir))


def test_jsonl_line_that_is_not_json_names_the_line(tmp_path, model_dir):
    path = tmp_path / "valid.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "a dog"\n')
    with pytest.raises(EvaluationError, match=r"valid\.jsonl: hf-perplexity: line 2 is not valid JSON"):
        HFPerplexity(path, seq_len=2).evaluate(cand(model_dir))


def test_data_that_is_not_utf8(tmp_path, model_dir):
    path = tmp_path / "latin1.txt"
    path.write_bytes("the caf\u00e9 sat on the mat".encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"latin1\.txt: hf-perplexity: the data file is not UTF-8 text"):
        HFPerplexity(path, seq_len=2).evaluate(cand(model_dir))


def test_folder_without_config_json(tmp_path, txt_file):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(EvaluationError, match=r"weights-only: hf-perplexity: no config\.json in the candidate folder"):
        HFPerplexity(txt_file).evaluate(cand(folder))


def test_folder_without_tokenizer_asks_for_the_option(tmp_path, txt_file):
    folder = save_candidate(tmp_path / "no-tok", 1, None)
    with pytest.raises(EvaluationError, match=r"no-tok: hf-perplexity: the candidate folder has no tokenizer .*"
                                              r"\(pass tokenizer= "):
        HFPerplexity(txt_file).evaluate(cand(folder))


def test_tokenizer_option_that_does_not_exist(tmp_path, txt_file, model_dir):
    with pytest.raises(UsageError, match=r"tok-missing: hf-perplexity: tokenizer= names a path that does not exist"):
        HFPerplexity(txt_file, tokenizer=tmp_path / "tok-missing")
    with pytest.raises(UsageError, match=r"tok-missing: hf-perplexity: tokenizer= names a path that does not exist"):
        HFPerplexity(txt_file, tokenizer=str(tmp_path / "tok-missing"))  # a string that is a path: checked too
    with pytest.raises(EvaluationError, match=r"cannot load tokenizer='no-such/tokenizer-here'.*nothing is downloaded"):
        HFPerplexity(txt_file, tokenizer="no-such/tokenizer-here").evaluate(cand(model_dir))


def test_tokenizer_that_does_not_fit_the_model(tmp_path, txt_file, tokenizer):
    small = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=5, n_positions=64,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(EvaluationError, match=r"token id \d+ but the model has only 5 embeddings"):
        HFPerplexity(txt_file, seq_len=16).evaluate(cand(small))


def test_seq_len_longer_than_the_model_positions(txt_file, model_dir):
    with pytest.raises(EvaluationError, match=r"seq_len=256 is longer than the model's 128 positions "
                                              r"\(pass seq_len <= 128\)"):
        HFPerplexity(txt_file, seq_len=256).evaluate(cand(model_dir))


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, r"device='tpu' is not cpu, cuda or cuda:N"),
    ({"dtype": "float8"}, r"dtype='float8' is not one of auto, float32"),
    ({"seq_len": 1}, r"seq_len=1 must be an integer >= 2"),
    ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
    ({"seq_len": 64, "max_tokens": 32}, r"max_tokens=32 is smaller than one block of seq_len=64"),
    ({"text_field": ""}, r"text_field='' must be a non-empty key name"),
])
def test_bad_options(txt_file, kwargs, message):
    with pytest.raises(UsageError, match=message):
        HFPerplexity(txt_file, **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where CUDA is missing")
def test_cuda_without_cuda_is_a_usage_error(txt_file):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match=rf"device='{device}' but CUDA is not available here"):
            HFPerplexity(txt_file, device=device)


def test_a_folder_transformers_cannot_load(tmp_path, txt_file, model_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((model_dir / f).read_bytes())
    with pytest.raises(EvaluationError, match=r"odd: hf-perplexity: cannot load raw as a causal LM: "):
        HFPerplexity(txt_file, seq_len=16).evaluate(cand(folder))


# -- BatchNorm recalibration ------------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class KwargsCNN(SmallCNN):
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(pixel_values)


def _batches(n: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def _wrong_stats_cnn(cls: type[SmallCNN] = SmallCNN) -> SmallCNN:
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(0.01)
            m.num_batches_tracked.fill_(1000)
    return model.eval()


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_update_bn_equals_torch_swa_utils():
    batches = _batches()
    model = _wrong_stats_cnn()
    expected = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, expected)
    before = _bn_buffers(model)
    assert update_bn(batches, model) == 5
    got = _bn_buffers(model)
    torch.testing.assert_close(got, _bn_buffers(expected), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["features.1.running_mean"], before["features.1.running_mean"])
    assert int(got["features.1.num_batches_tracked"]) == 5
    assert model.features[1].momentum == 0.3 and model.features[4].momentum == 0.1  # momenta restored
    assert not model.training  # eval mode restored
    model.train()
    update_bn(batches, model)
    assert model.training  # train mode restored too


def test_update_bn_max_batches_and_dict_batches():
    batches = _batches(6)
    expected = _wrong_stats_cnn()
    torch.optim.swa_utils.update_bn(batches[:2], expected)
    model = _wrong_stats_cnn(KwargsCNN)
    dict_batches = [{"pixel_values": x, "labels": y} for x, y in batches]
    assert update_bn(dict_batches, model, max_batches=2, device="cpu") == 2
    torch.testing.assert_close(_bn_buffers(model), _bn_buffers(expected), rtol=1e-6, atol=1e-6)
    plain = _wrong_stats_cnn()
    assert update_bn((x for x, _ in batches), plain, max_batches=2) == 2  # bare tensors from a generator
    torch.testing.assert_close(_bn_buffers(plain), _bn_buffers(expected), rtol=1e-6, atol=1e-6)


def test_update_bn_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))

    def loader():
        raise AssertionError("the loader must not be read")
        yield  # pragma: no cover

    assert update_bn(loader(), model) == 0
    assert calls == []


def test_update_bn_errors_leave_the_model_usable():
    model = _wrong_stats_cnn()
    before = _bn_buffers(model)
    with pytest.raises(EvaluationError, match=r"update_bn: the loader yielded no batches"):
        update_bn([], model)
    torch.testing.assert_close(_bn_buffers(model), before)  # untouched
    with pytest.raises(EvaluationError, match=r"update_bn: the forward pass on batch 1 failed"):
        update_bn([torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)], model)
    assert model.features[1].momentum == 0.3 and not model.training
    with pytest.raises(UsageError, match=r"max_batches=0 must be a positive integer"):
        update_bn(_batches(), model, max_batches=0)


def test_with_bn_recalibration_loads_recalibrates_and_evaluates(tmp_path):
    trained = _wrong_stats_cnn()  # stands for averaged weights with stale statistics
    batches = _batches(4)
    probe = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {"out_mean": model(probe).mean().item()}

    fn = with_bn_recalibration(evaluate_fn, SmallCNN, batches, max_batches=3)
    got = fn(trained.state_dict())
    expected = copy.deepcopy(trained)
    torch.optim.swa_utils.update_bn(batches[:3], expected)
    assert got["out_mean"] == pytest.approx(evaluate_fn(expected)["out_mean"], abs=1e-6)
    assert got["out_mean"] != pytest.approx(evaluate_fn(trained)["out_mean"], abs=1e-3)  # stale stats differ
    # a Candidate works too: its state_dict() is read from the folder
    folder = tmp_path / "cnn"
    folder.mkdir()
    save_file(trained.state_dict(), str(folder / "model.safetensors"))
    assert fn(Candidate(name="swa", step=1, model_dir=folder)) == pytest.approx(got, abs=1e-6)
    with pytest.raises(EvaluationError, match=r"do not fit build_model\(\): missing head\.3\.bias"):
        fn({k: v for k, v in trained.state_dict().items() if k != "head.3.bias"})


def test_dtype_option_sets_the_compute_dtype(model_dir, txt_file):
    full = HFPerplexity(txt_file, seq_len=32, dtype="float32")
    f32 = full.evaluate(cand(model_dir))
    assert full._model.dtype == torch.float32
    half = HFPerplexity(txt_file, seq_len=32, dtype="bfloat16")
    bf16 = half.evaluate(cand(model_dir))
    assert half._model.dtype == torch.bfloat16
    assert bf16["val_tokens"] == f32["val_tokens"]
    assert bf16["val_loss"] == pytest.approx(f32["val_loss"], abs=0.05)
    assert bf16["val_loss"] != f32["val_loss"]  # really computed in bfloat16


def test_update_bn_takes_torchs_argument_order():
    """``update_bn(loader, model)`` as ``torch.optim.swa_utils.update_bn``; the old order is refused by name."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with pytest.raises(UsageError, match=r"update_bn\(loader, model\): the model was passed first"):
        update_bn(model, batches)
    assert update_bn(batches, model, "cpu") == 3
