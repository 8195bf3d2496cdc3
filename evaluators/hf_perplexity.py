"""The ``hf-perplexity`` evaluator: validation loss of a causal LM on a local text file.

Each candidate folder (``config.json`` + safetensors, what ``save_pretrained`` writes) is loaded
with ``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``; nothing is downloaded.
The data (a ``.txt`` file, or ``.jsonl`` with one ``{"text": ...}`` object a line) is tokenized
once (with ``tokenizer=`` if given, else with the first candidate folder's tokenizer: the
candidates of one run share it), each document's ids concatenated (with the special tokens the
tokenizer adds, e.g. a BOS), and cut into non-overlapping blocks of ``seq_len`` tokens as Hugging
Face's ``run_clm`` example does, at most ``max_tokens`` tokens in all. Each block scores its
``seq_len - 1`` next-token predictions, so::

    val_loss   = sum of the per-token cross-entropies / val_tokens   (nats, float64 sum)
    val_ppl    = exp(val_loss)
    val_tokens = number of blocks * (seq_len - 1)

The model is built once and later candidates with the same ``config.json`` (and, with
``dtype="auto"``, the same tensor dtypes) are loaded into it with ``load_state_dict``: an
evaluation round costs a copy of the weights, not a model construction. Tied weights stay tied
(the tensors are copied into the existing parameters).

Example::

    from ckptavg.evaluators.hf_perplexity import HFPerplexity
    ev = HFPerplexity(Path("valid.jsonl"), seq_len=512, max_tokens=262_144, device="cuda")
    ev.evaluate(candidate)   # {"val_loss": 2.31, "val_ppl": 10.07, "val_tokens": 261632.0}
    ev.close()
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError, check_metrics

if TYPE_CHECKING:  # transformers is imported lazily: the rest of ckptavg works without it
    from transformers import PreTrainedModel

__all__ = ["HFPerplexity", "read_texts"]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Files that hold a vocabulary. A folder with none of them is not a tokenizer folder (transformers 5 would
# otherwise hand back an empty tokenizer built from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")
_IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version")
_LOGITS_CHUNK = 2**25  # logits turned to float32 at once, in elements


class HFPerplexity:
    """Token-weighted validation cross-entropy and perplexity of a Hugging Face causal LM."""

    name = "hf-perplexity"

    def __init__(
        self,
        data: Path,
        *,
        batch_size: int = 8,
        seq_len: int = 256,
        max_tokens: int = 65536,
        device: str = "cpu",
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        text_field: str = "text",
    ) -> None:
        self.data = Path(data)
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 2)
        _check_int("max_tokens", max_tokens, 2)
        if max_tokens < seq_len:
            raise UsageError(f"hf-perplexity: max_tokens={max_tokens} is smaller than one block of seq_len={seq_len}",
                             hint="raise max_tokens or lower seq_len")
        if dtype not in DTYPES:
            raise UsageError(f"hf-perplexity: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(text_field, str) or not text_field:
            raise UsageError(f"hf-perplexity: text_field={text_field!r} must be a non-empty key name")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.device = _check_device(device)
        self.dtype = dtype
        self.text_field = text_field
        if isinstance(tokenizer, str) and tokenizer.startswith(("/", "./", "../", "~")):
            tokenizer = Path(tokenizer).expanduser()  # a path, not a model name in the local HF cache
        self.tokenizer = tokenizer
        if isinstance(tokenizer, Path) and not tokenizer.exists():
            raise UsageError("hf-perplexity: tokenizer= names a path that does not exist", path=tokenizer,
                             hint="pass a tokenizer folder, a tokenizer.json file, or leave tokenizer unset to use "
                                  "each candidate folder's own")
        _data_kind(self.data)  # fail now, not at the first evaluation round, on a wrong path or suffix
        self._tokens: torch.Tensor | None = None  # the blocks, (n_blocks, seq_len) int64, CPU
        self._model: PreTrainedModel | None = None
        self._config: dict[str, Any] | None = None  # config.json of the built model, minus volatile keys
        self._file_index: dict[str, str] = {}  # tensor name -> dtype in the safetensors of the model's folder
        self._file_keys: frozenset[str] = frozenset()
        self._absent_ok: frozenset[str] = frozenset()  # model keys no folder stores (tied weights, filled buffers)
        self._reusable = False

    # -- the protocol -----------------------------------------------------------------------------

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        t0 = time.perf_counter()
        model_dir = Path(candidate.model_dir)
        config = _read_config(model_dir)
        blocks = self._blocks(model_dir)
        model = self._model_for(candidate, config)
        self._check_fits(model, blocks, model_dir)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                for i in range(0, blocks.shape[0], self.batch_size):
                    batch = blocks[i:i + self.batch_size].to(self.device)
                    logits = model(input_ids=batch, use_cache=False).logits
                    # a few rows at a time: the float32 copy of the logits stays under ~128 MiB
                    rows = max(1, _LOGITS_CHUNK // (logits.shape[1] * logits.shape[2]))
                    for r in range(0, batch.shape[0], rows):
                        lg = logits[r:r + rows, :-1].float()
                        ce = F.cross_entropy(lg.flatten(0, 1), batch[r:r + rows, 1:].flatten(), reduction="sum")
                        total += ce.double()
                    del logits
        except torch.cuda.OutOfMemoryError as exc:
            raise EvaluationError(f"hf-perplexity on {candidate.name}: out of GPU memory", path=model_dir,
                                  hint=f"lower batch_size (now {self.batch_size}) or seq_len (now {self.seq_len})",
                                  ) from exc
        except RuntimeError as exc:
            raise EvaluationError(f"hf-perplexity on {candidate.name}: the forward pass failed: {exc}",
                                  path=model_dir) from exc
        n = blocks.shape[0] * (self.seq_len - 1)
        loss = total.item() / n
        metrics = check_metrics({"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": n},
                                evaluator=self.name, candidate=candidate.name)
        log.info("hf-perplexity %s (step %d): val_loss %.4f, ppl %.3f over %d tokens in %.1f s", candidate.name,
                 candidate.step, loss, metrics["val_ppl"], n, time.perf_counter() - t0)
        return metrics

    def close(self) -> None:
        """Release the model (and its GPU memory) and the token cache; a later evaluate() rebuilds them."""
        had_model = self._model is not None
        self._model = None
        self._config = None
        self._reusable = False
        self._tokens = None
        if had_model:
            _free(self.device)

    # -- data -------------------------------------------------------------------------------------

    def _blocks(self, model_dir: Path) -> torch.Tensor:
        """The data as (n_blocks, seq_len) token ids, tokenized on first use and cached."""
        if self._tokens is not None:
            return self._tokens
        if self.tokenizer is not None:
            tokenizer = load_tokenizer(self.tokenizer, option=True)
        else:
            tokenizer = load_tokenizer(model_dir, option=False)
        t0 = time.perf_counter()
        ids: list[int] = []
        for text in read_texts(self.data, text_field=self.text_field):
            ids.extend(tokenizer(text, verbose=False)["input_ids"])
            if len(ids) >= self.max_tokens:
                break
        if len(ids) < self.seq_len:
            raise EvaluationError(f"hf-perplexity: the data has {len(ids)} tokens, fewer than one block of "
                                  f"seq_len={self.seq_len}", path=self.data,
                                  hint=f"pass a smaller seq_len (at most {max(len(ids), 2)}) or more text")
        n_blocks = min(len(ids), self.max_tokens) // self.seq_len
        self._tokens = torch.tensor(ids[:n_blocks * self.seq_len], dtype=torch.long).view(n_blocks, self.seq_len)
        log.info("hf-perplexity: %s tokenized into %d blocks of %d tokens in %.1f s", self.data, n_blocks,
                 self.seq_len, time.perf_counter() - t0)
        return self._tokens

    # -- the model --------------------------------------------------------------------------------

    def _model_for(self, candidate: Candidate, config: dict[str, Any]) -> PreTrainedModel:
        """The built model if this candidate's weights can be copied into it, else a fresh one."""
        model_dir = Path(candidate.model_dir)
        if self._model is not None and self._reusable and config == self._config:
            files = _safetensors_index(model_dir)
            # under dtype=auto, from_pretrained picks the dtypes from the files: other dtypes, another build
            same_dtypes = self.dtype != "auto" or set(files) != self._file_keys or files == self._file_index
            if files and same_dtypes:
                self._load_into(self._model, candidate.state_dict(), candidate)
                log.debug("hf-perplexity: %s loaded into the model already built", candidate.name)
                return self._model
        if self._model is not None:  # free the old one (and its GPU memory) before building the next
            self._model = None
            _free(self.device)
        model = _from_pretrained(model_dir, self.dtype, candidate.name)
        model.to(self.device).eval()
        self._model, self._config = model, config
        self._file_index = _safetensors_index(model_dir)
        self._file_keys = frozenset(self._file_index)
        model_keys = set(model.state_dict())
        # Reuse only where the files' tensor names are the model's own (no conversion at load, as for fused MoE
        # experts); names the folder lacks are tied aliases or buffers from_pretrained fills, the same every time.
        self._reusable = bool(self._file_keys) and self._file_keys <= model_keys
        self._absent_ok = frozenset(model_keys - self._file_keys)
        return model

    def _load_into(self, model: PreTrainedModel, state: dict[str, torch.Tensor], candidate: Candidate) -> None:
        """Copy ``state`` into ``model`` (cast to the model's dtypes); tied parameters stay one tensor."""
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state) - self._absent_ok)
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected {_names(unexpected)}")
            raise EvaluationError(f"hf-perplexity: {candidate.name} does not fit the model built from the earlier "
                                  f"candidates although config.json is the same: {'; '.join(parts)}",
                                  path=candidate.model_dir,
                                  hint="every candidate must hold the same tensors; is a checkpoint incomplete?")
        for k, t in state.items():
            if t.shape != own[k].shape:
                raise EvaluationError(f"hf-perplexity: {candidate.name} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(own[k].shape)}", path=candidate.model_dir, tensor=k)
        model.load_state_dict(state, strict=False)

    def _check_fits(self, model: PreTrainedModel, blocks: torch.Tensor, model_dir: Path) -> None:
        """Token ids within the embedding, blocks within the position range: errors here, not deep in torch."""
        vocab = model.get_input_embeddings().weight.shape[0]
        top = int(blocks.max())
        if top >= vocab:
            raise EvaluationError(f"hf-perplexity: the tokenizer yields token id {top} but the model has only "
                                  f"{vocab} embeddings", path=model_dir,
                                  hint="the tokenizer does not belong to this model; pass the right tokenizer=")
        text_config = model.config.get_text_config()
        limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
        if isinstance(limit, int) and self.seq_len > limit:
            raise EvaluationError(f"hf-perplexity: seq_len={self.seq_len} is longer than the model's {limit} "
                                  "positions", path=model_dir, hint=f"pass seq_len <= {limit}")


# -- helpers --------------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    """Collect the released model now (module graphs can hold reference cycles) and return cached GPU memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_int(option: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(f"hf-perplexity: {option}={value!r} must be an integer >= {least}")


def _check_device(device: str) -> torch.device:
    """cpu, cuda or cuda:N, where that device exists."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(device))
    if not m or (m.group(1) == "cpu" and m.group(2) is not None):
        raise UsageError(f"hf-perplexity: device={device!r} is not cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"hf-perplexity: device={device!r} but CUDA is not available here",
                             hint="use device='cpu', or a torch build with CUDA on a machine with a GPU")
        index = int(m.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"hf-perplexity: device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                             "are visible", hint="check CUDA_VISIBLE_DEVICES")
    return torch.device(str(device))


def _data_kind(path: Path) -> str:
    if not path.is_file():
        raise EvaluationError("hf-perplexity: the data file does not exist" if not path.exists()
                              else "hf-perplexity: the data path is not a file", path=path,
                              hint="pass data= a .txt file or a .jsonl file with one {\"text\": ...} object a line")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise UsageError(f"hf-perplexity: data= has suffix {suffix!r}; expected plain text "
                     f"({', '.join(TEXT_SUFFIXES)}) or JSON lines ({', '.join(JSONL_SUFFIXES)})", path=path)


def read_texts(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """The documents of a data file: a text file's whole text, or each JSON line's ``text_field`` string.

    Raises :class:`EvaluationError` naming the file (and line) for a missing or empty file, invalid
    UTF-8 or JSON, or a line without the field.
    """
    path = Path(path)
    kind = _data_kind(path)
    found = False
    try:
        if kind == "text":
            text = path.read_text(encoding="utf-8")
            if text.strip():
                found = True
                yield text
        else:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    text = _jsonl_text(path, lineno, line, text_field)
                    if text.strip():
                        found = True
                        yield text
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"hf-perplexity: the data file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              path=path) from exc
    if not found:
        what = "holds no text" if kind == "text" else f"has no line with a non-empty {text_field!r} string"
        raise EvaluationError(f"hf-perplexity: the data file is empty: it {what}", path=path,
                              hint="point data= at the validation text")


def _jsonl_text(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"hf-perplexity: line {lineno} is not valid JSON ({exc.msg})", path=path) from exc
    if not isinstance(obj, dict) or text_field not in obj:
        keys = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise EvaluationError(f"hf-perplexity: line {lineno} has no {text_field!r} field (found {keys})", path=path,
                              hint="set text_field= to the key that holds the text")
    text = obj[text_field]
    if not isinstance(text, str):
        raise EvaluationError(f"hf-perplexity: line {lineno}: field {text_field!r} is a {type(text).__name__}, "
                              "expected a string", path=path)
    return text


def load_tokenizer(source: str | Path, *, option: bool) -> Any:
    """A tokenizer from a folder, a ``tokenizer.json`` file, or (``option`` only) a name in the local HF cache.

    ``option`` says whether ``source`` came from the ``tokenizer=`` option (True) or is a candidate
    folder (False); the error message differs accordingly.
    """
    transformers = _transformers()
    path = Path(source)
    try:
        if path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        if path.is_dir():
            if not any((path / f).is_file() for f in TOKENIZER_FILES):
                if option:
                    raise EvaluationError("hf-perplexity: tokenizer= is a folder without tokenizer files "
                                          f"({', '.join(TOKENIZER_FILES)})", path=path)
                raise EvaluationError("hf-perplexity: the candidate folder has no tokenizer "
                                      f"(none of {', '.join(TOKENIZER_FILES)})", path=path,
                                      hint="pass tokenizer= a tokenizer folder or tokenizer.json, e.g. the one the "
                                           "trainer saved")
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if isinstance(source, Path) or not option:
            raise EvaluationError("hf-perplexity: the tokenizer path does not exist", path=path)
        return transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except EvaluationError:
        raise
    except Exception as exc:  # any failure inside transformers becomes one line naming the source
        where = f"tokenizer={str(source)!r}" if option else f"the tokenizer in {source}"
        raise EvaluationError(f"hf-perplexity: cannot load {where}: {type(exc).__name__}: {exc}",
                              hint="pass a local tokenizer folder or tokenizer.json (nothing is downloaded)",
                              ) from exc


def _from_pretrained(model_dir: Path, dtype: str, name: str) -> PreTrainedModel:
    transformers = _transformers()
    try:
        with _quiet_progress(transformers):
            return transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                                     dtype=DTYPES[dtype])
    except Exception as exc:  # any failure inside transformers becomes one line naming the source
        raise EvaluationError(f"hf-perplexity: cannot load {name} as a causal LM: {type(exc).__name__}: {exc}",
                              path=model_dir) from exc


@contextlib.contextmanager
def _quiet_progress(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar in the daemon's log; the previous setting is restored."""
    hf_logging = transformers.utils.logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise EvaluationError("hf-perplexity: no config.json in the candidate folder", path=model_dir,
                              hint="hf-perplexity loads a transformers model folder (what save_pretrained writes); "
                                   "for other models use a command or python evaluator")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"hf-perplexity: config.json is not valid JSON ({exc})", path=path) from exc
    if not isinstance(config, dict):
        raise EvaluationError("hf-perplexity: config.json is not a JSON object", path=path)
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def _safetensors_index(model_dir: Path) -> dict[str, str]:
    """Tensor name -> dtype ("BF16", "F32", ...) in the folder's safetensors files, from the headers alone."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                names = sf.keys()  # a safe_open handle is not iterable
                index.update((k, sf.get_slice(k).get_dtype()) for k in names)
        except Exception as exc:  # a truncated or invalid file: one line naming it
            raise EvaluationError(f"hf-perplexity: cannot read the safetensors header: {exc}", path=f) from exc
    return index


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise UsageError("hf-perplexity needs the transformers package", hint="pip install transformers") from exc
    return transformers
