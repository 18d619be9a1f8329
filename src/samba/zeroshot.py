"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness, chunk-output sparsity applied.

    python -m samba.zeroshot MODEL_DIR --tasks T1,T2 [--head main|readout] [--include-path DIR]
                             [--limit N] [--batch-size B] [--output FILE] [--device D]
    python -m samba.zeroshot compare A.json B.json

lm-eval's tasks run unchanged; only the model is ours: ``SambaLM`` is an lm-eval ``LM``
(registered as ``samba``) that answers its three kinds of request with a Samba model, from
either head, with the model's own ``sparsity_target`` applied:

- ``loglikelihood``: log P(continuation | context) and whether greedy decoding gives the
  continuation. Requests are bucketed by padded length (powers of two up to ``max_length``)
  and continuation length, and each bucket's batches have one shape, so on CUDA a batch is
  one replayed CUDA graph (``cuda_graphs.GraphedCallable``). Only the continuation's
  positions reach the vocabulary projection, in slices: the (batch x length x vocab) logits
  are never built.
- ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` tokens (2,048, as
  its transformers backend uses for Mamba), scored the same way.
- ``generate_until``: ``samba.generate`` with one kept ``Decoder`` (batch 1), stopped at the
  request's stop strings.

Offline, a task reads local files (``dataset_path: json`` with ``dataset_kwargs.data_files``,
a relative path read from the current directory); ``benchmarks/zeroshot_tasks/`` has such
tasks, which take lm-eval's own definitions and change only where the data comes from. A task
that needs the Hugging Face Hub when the Hub cannot be reached is refused before anything is
loaded, naming the task.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .config import ComputeConfig, ConfigError
from .cuda_graphs import GraphedCallable, graphs_wanted
from .data import TOKENIZER_FILE, DataError, load_tokenizer
from .generate import HEADS, Decoder, generate
from .hub import HubUnavailableError, hub_offline_mode, hub_reachable
from .io import require_writable, write_json_atomic
from .model import Samba
from .ops.linear_cross_entropy import MAX_SLICE_ELEMENTS, _compute_dtype, _logits_fp32
from .runtime import autocast, autocast_dtype, resolve_device

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
MAX_LENGTH = 2048  # lm-eval's transformers backend uses this for models without a position limit (Mamba)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")  # datasets' readers of local files
OUTPUT_KEYS = ("results", "configs", "versions", "higher_is_better", "n-samples", "config")
PRECISIONS = ("auto", "bf16", "fp32")  # compute.precision's values


class ZeroShotError(DataError):
    """A task, its data or a results file cannot be used as asked."""


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """(N, H) hidden vectors, (V, H) head, (N,) targets -> log P(target) (N,) fp32 and whether
    the target is the argmax (N,), the (N, V) logits made slice by slice (as in
    ``ops.linear_nll_and_correct``) in fp32."""
    compute_dtype = _compute_dtype(hidden, weight)
    acc = torch.promote_types(compute_dtype, torch.float32)
    step = max(1, MAX_SLICE_ELEMENTS // weight.shape[0])
    w = weight.to(compute_dtype)
    logprobs, hits = [], []
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], step):
            t = targets[start:start + step]
            logits = _logits_fp32(hidden[start:start + step].to(compute_dtype), w, acc)  # (S, V)
            logprobs.append(logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
            hits.append(logits.argmax(dim=-1) == t)
    return torch.cat(logprobs), torch.cat(hits)


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded sizes: powers of two from ``smallest``, then ``max_length``."""
    sizes = [smallest]
    while sizes[-1] * 2 < max_length:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_length})


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class Scorer:
    """log P(continuation | context) for token lists, batched by shape.

    ``head``'s vectors are taken only at the scored positions (the last ``len(continuation)``
    inputs of each row); rows are right-padded, which the causal model never sees."""

    def __init__(self, model: Samba, head: str, dtype: torch.dtype | None, graphs: bool, batch_size: int,
                 batch_tokens: int, max_length: int):
        self.model, self.head, self.dtype, self.graphs = model, head, dtype, graphs
        self.batch_size, self.batch_tokens, self.max_length = batch_size, batch_tokens, max_length
        self.lengths = length_buckets(max_length)  # of a row
        self.widths = length_buckets(max_length, smallest=1)  # scored positions of a row
        self.device = model.embedding.weight.device

    def rows(self, length: int, available: int) -> int:
        rows = max(1, self.batch_tokens // length) if self.batch_tokens > 0 else self.batch_size
        return min(rows, available)

    def _batch_fn(self, rows: int, width: int):
        model, head = self.model, self.head

        def batch(inputs: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
            # inputs (R, L); positions, targets, mask (R * W,): W slots a row, flat indices into R * L
            with autocast(inputs.device, self.dtype, cache=False):
                outputs = model.chunk_outputs(inputs)  # n_chunks x (R, L, D)
                if head == "main":
                    last = outputs[-1].reshape(-1, outputs[-1].shape[-1])[positions]
                    hidden, weight = model.final_hidden([last]), model.lm_head_weight
                else:
                    picked = [o.reshape(-1, o.shape[-1])[positions] for o in outputs]
                    hidden, weight = model.readout.features(picked), model.readout.head.weight
                logprob, hit = token_logprobs(hidden, weight, targets)
            total = (logprob.double() * mask).view(rows, width).sum(1)
            greedy = (hit | ~mask).view(rows, width).all(1)
            return torch.stack([total, greedy.double()], dim=1)  # (R, 2)
        return batch

    def _pack(self, items, rows: int, length: int, width: int):
        """Host arrays of one batch: items are (index, input ids, continuation ids)."""
        inputs = np.zeros((rows, length), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        targets = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=bool)
        for r, (_, inp, cont) in enumerate(items):
            n, m = len(inp), len(cont)
            inputs[r, :n] = inp
            positions[r, :m] = r * length + np.arange(n - m, n)
            targets[r, :m] = cont
            mask[r, :m] = True
        index = np.array([i for i, _, _ in items], dtype=np.int64)
        return [torch.from_numpy(a) for a in (inputs, positions.ravel(), targets.ravel(), mask.ravel(), index)]

    def _to_device(self, arrays: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host memory, so that the copies do not wait for the GPU to finish its queue."""
        if self.device.type != "cuda":
            return arrays
        return [a.pin_memory().to(self.device, non_blocking=True) for a in arrays]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], desc: str | None = None) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (sum of log-probabilities, greedy) each."""
        groups = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            if not continuation or len(continuation) > self.max_length:
                raise ZeroShotError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                    f"max_length {self.max_length}")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            inp = tokens[:-1]  # left-truncated to max_length, as lm-eval's transformers backend does
            groups[bucket(len(inp), self.lengths), bucket(len(continuation), self.widths)].append(
                (i, inp, list(continuation)))
        out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.device)
        progress = tqdm(total=len(pairs), desc=desc, disable=desc is None, leave=False)
        self.model.eval()
        for (length, width), items in sorted(groups.items(), reverse=True):  # longest first, as lm-eval does
            items.sort(key=lambda item: -len(item[1]))
            rows = self.rows(length, len(items))
            step = GraphedCallable(self._batch_fn(rows, width), enabled=graphs_wanted(self.graphs, self.device),
                                   warmup=2, name=f"loglikelihood batch {rows} x {length}")
            for start in range(0, len(items), rows):
                chunk = items[start:start + rows]
                *batch, index = self._to_device(self._pack(chunk, rows, length, width))
                out[index] = step(*batch)[:len(chunk)]  # stays on the device: no wait per batch
                progress.update(len(chunk))
            step.release()
        progress.close()
        return [(total, greedy > 0.5) for total, greedy in out.tolist()]


# ----------------------------------------------------------------------------- the lm-eval model

class _StopGeneration(Exception):
    """Raised from ``generate``'s token callback once a stop string has appeared."""


@register_model("samba")
class SambaLM(TemplateLM):
    """A Samba model as an lm-eval ``LM``: ``SambaLM(model_dir)`` or ``SambaLM(model, tokenizer)``.

    From lm-eval's own command line (after ``import samba.zeroshot``):
    ``--model samba --model_args pretrained=MODEL_DIR,head=readout``."""

    def __init__(self, pretrained: str | Path | Samba, tokenizer=None, head: str = "main",
                 batch_size: int | str = 32, batch_tokens: int | str = 0, max_length: int | str = MAX_LENGTH,
                 device: str | None = None, precision: str = "auto", cuda_graphs: bool | str = True,
                 max_gen_toks: int | str = 256, **_ignored):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"--head must be one of {list(HEADS)}, got {head!r}")
        compute, where = _compute(device or "auto", precision)
        if isinstance(pretrained, Samba):  # used where it is
            self.model, self.model_dir = pretrained, None
        else:
            self.model_dir = Path(pretrained)
            tokenizer = tokenizer or self.model_dir / TOKENIZER_FILE
            if not Path(tokenizer).exists():
                raise ZeroShotError(f"{self.model_dir} records no tokenizer ({TOKENIZER_FILE}); pass --tokenizer")
            self.model = Samba.from_pretrained(self.model_dir, device=where)
        self.tokenizer = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
        if self.tokenizer is None:
            raise ZeroShotError("SambaLM needs a tokenizer (a tokenizers.Tokenizer or a tokenizer.json path)")
        self._eot = self.tokenizer.token_to_id(END_OF_TEXT)
        if self._eot is None:
            raise ZeroShotError(f"the tokenizer has no {END_OF_TEXT} token, which lm-eval puts before an empty "
                                "context and each document's first window")
        self.model.eval()
        self.head, self._max_length, self.max_gen_toks = head, int(max_length), int(max_gen_toks)
        self._device = self.model.embedding.weight.device
        self.graphs = str(cuda_graphs).lower() not in ("false", "0", "no")
        self.scorer = Scorer(self.model, head, autocast_dtype(compute, self._device), self.graphs,
                             int(batch_size), int(batch_tokens), self._max_length)
        self._decoder: Decoder | None = None

    # --- what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"samba-{self.tokenizer.get_vocab_size(with_added_tokens=True)}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_dir": str(self.model_dir), "head": self.head,
                "sparsity_target": self.model.config.sparsity_target, "max_length": self._max_length,
                "precision": "bf16" if self.scorer.dtype is not None else "fp32", "device": str(self._device),
                "cuda_graphs": graphs_wanted(self.graphs, self._device)}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self.scorer.score([(context, continuation) for _, context, continuation in requests],
                                    desc=None if disable_tqdm else "loglikelihood")
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (string,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(string), self._eot, self._max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        answers = self.scorer.score(windows, desc=None if disable_tqdm else "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, answers):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        results = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = kwargs.pop("max_gen_toks")
            prompt = self.tok_encode(context)[-max(1, self._max_length - max_new):] or [self._eot]
            text = self._generate(prompt, max_new, until, float(kwargs.get("temperature", 0.0)),
                                  float(kwargs.get("top_p", 1.0)))
            results.append(postprocess_generated_text(text, until, None))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), results[-1])
        return results

    def _generate(self, prompt: list[int], max_new: int, until: list[str], temperature: float, top_p: float) -> str:
        """New text after ``prompt``, up to ``max_new`` tokens, the end-of-text token or a stop string."""
        if self._decoder is None:  # kept: its captured decoding step serves every request
            self._decoder = Decoder(self.model, 1, self.head, graphs=self.graphs)
        produced: list[int] = []

        def on_token(tokens: torch.Tensor) -> None:
            produced.append(int(tokens[0]))
            if produced[-1] == self._eot or any(s and s in self.tok_decode(produced) for s in until):
                raise _StopGeneration

        ids = torch.tensor([prompt], device=self._device)
        try:
            generate(self.model, ids, max_new, self.head, temperature, top_p, decoder=self._decoder,
                     on_token=on_token)
        except _StopGeneration:
            pass
        if produced and produced[-1] == self._eot:
            produced.pop()
        return self.tok_decode(produced)


def _compute(device: str, precision: str) -> tuple[ComputeConfig, torch.device]:
    """The compute settings and device the command line's words name; errors name the option."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")
    try:
        compute = ComputeConfig(device=device, precision=precision)
        return compute, resolve_device(compute)  # refuses a bad name, or CUDA without a GPU
    except ConfigError as err:
        raise ConfigError(f"--device {device}: {str(err).split(': ', 1)[-1]}") from None


# ----------------------------------------------------------------------------- tasks, offline

def hub_can_serve() -> bool:
    """Whether a task may read the Hugging Face Hub: offline mode (its cache) or a reachable Hub.
    When neither, offline mode is set for this process, so that ``datasets`` (which reads it
    once, at import: call this first) never waits on retries."""
    if hub_offline_mode() or hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    return False


def _leaves(index: dict, name: str, overrides: dict | None = None) -> list[tuple[str, dict | None]]:
    """Every task that ``name`` runs, with its configuration as the include path defines it
    (groups' overrides applied, in lm-eval's order of precedence); None where only lm-eval's
    own definition says where the data is."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    overrides = overrides or {}
    entry = index.get(name)
    if entry is None:  # lm-eval's own task (or an unknown name), perhaps with a group's overrides
        return [(name, overrides or None)]
    if entry.kind is Kind.TAG:
        return [leaf for task in sorted(entry.tags) for leaf in _leaves(index, task, overrides)]
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
    if entry.kind is not Kind.GROUP:
        return [(name, {**cfg, **overrides})]
    return _group_leaves(index, cfg, overrides)


def _group_leaves(index: dict, cfg: dict, overrides: dict) -> list[tuple[str, dict | None]]:
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES

    shared = {**{k: v for k, v in cfg.items() if k not in GROUP_FIELD_NAMES}, **overrides}
    leaves = []
    for child in cfg.get("task") or []:
        if isinstance(child, str):
            leaves += _leaves(index, child, shared)
        elif isinstance(child, dict) and "group" in child:
            leaves += _group_leaves(index, child, shared)
        elif isinstance(child, dict) and "task" in child:
            leaves += _leaves(index, child["task"], {**shared, **child})
    return leaves


def _data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    files = list(files.values()) if isinstance(files, dict) else [files]
    return [str(f) for item in files for f in (item if isinstance(item, list) else [item])]


def check_sources(names: list[str], include_paths: list[Path], hub_ok: bool) -> bool:
    """Refuse, before anything is loaded, a task whose local data files are missing, or that
    needs the Hub when the Hub cannot serve it. Reads the include path only: lm-eval's own
    tasks all read the Hub. Returns whether any of lm-eval's own task definitions is used."""
    from lm_eval.tasks._index import TaskIndex

    index = TaskIndex.build(include_paths) if include_paths else {}
    builtin = False
    for name in names:
        for leaf, cfg in _leaves(index, name):
            builtin = builtin or leaf not in index
            where = repr(name) if leaf == name else f"{name!r} (its task {leaf!r})"
            path = (cfg or {}).get("dataset_path")
            if path in LOCAL_BUILDERS:
                files = _data_files(cfg)
                if not files and not (cfg.get("dataset_kwargs") or {}).get("data_dir"):
                    raise ZeroShotError(f"task {where}: dataset_path {path} needs dataset_kwargs.data_files")
                for f in files:
                    if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                        raise ZeroShotError(f"task {where}: data file {f} not found (a relative path is read "
                                            f"from the current directory, {Path.cwd()}; the tasks of "
                                            "benchmarks/zeroshot_tasks/ read .gpu/zeroshot/, which its README "
                                            "says how to build)")
            elif path and Path(str(path)).expanduser().is_dir():
                continue
            elif not hub_ok:
                source = (f"reads {path!r}" if path else
                          "is not defined under --include-path: if it is one of lm-eval's own, it reads its data")
                raise HubUnavailableError(
                    f"task {where} {source} from the Hugging Face Hub, which cannot be reached: point a task at "
                    "local files (dataset_path: json, dataset_kwargs: {data_files: ...}) in a directory given as "
                    "--include-path (benchmarks/zeroshot_tasks/ holds such tasks), or set HF_HUB_OFFLINE=1 to "
                    "read the Hugging Face cache")
    return builtin


def load_tasks(names: list[str], include_paths: list[Path], hub_ok: bool, builtin: bool = True):
    """lm-eval's Task / Group objects for ``names`` (their data loaded), and the TaskManager.
    ``builtin``: index lm-eval's own tasks too (thousands of YAML files: seconds)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=builtin)
    objects = []
    for name in names:
        if name not in manager.all_tasks:
            raise ZeroShotError(f"task {name!r} is neither one of lm-eval's tasks nor defined under "
                                f"--include-path {[str(p) for p in include_paths]}")
        try:
            loaded = manager.load(name)
        except Exception as err:  # the data: missing from the cache, unreadable, not what the task expects
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            hint = "" if hub_ok and not hub_offline_mode() else " (the Hugging Face Hub is offline here)"
            raise ZeroShotError(f"task {name!r}: lm-eval could not load its data{hint}: "
                                f"{type(err).__name__}: {first}") from err
        objects.append(loaded["groups"][name] if name in loaded["groups"] else
                       loaded["tasks"][name] if name in loaded["tasks"] else list(loaded["tasks"].values()))
    return [o for obj in objects for o in (obj if isinstance(obj, list) else [obj])], manager


def evaluate_tasks(lm: SambaLM, names: list[str], include_paths: list[Path], hub_ok: bool,
                   limit: float | None = None, bootstrap_iters: int = 100000) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm``: its results dict (no samples)."""
    from lm_eval.evaluator import simple_evaluate

    builtin = check_sources(names, include_paths, hub_ok)
    tasks, manager = load_tasks(names, include_paths, hub_ok, builtin)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                           bootstrap_iters=bootstrap_iters, log_samples=False)


def write_results(path: str | Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    kept = {k: results[k] for k in OUTPUT_KEYS if k in results}
    write_json_atomic(path, json.loads(json.dumps(kept, default=handle_non_serializable)))


# ----------------------------------------------------------------------------- compare

def read_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """task -> metric -> value from a ``--output`` file (stderrs and aliases left out)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ZeroShotError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZeroShotError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ZeroShotError(f"{path}: has no 'results'; write one with python -m samba.zeroshot ... --output FILE")
    table: dict[str, dict[str, float]] = {}
    for task, metrics in data["results"].items():
        for key, value in (metrics or {}).items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # lm-eval's metrics are "metric,filter"; also there: alias, sample_len
            metric, _, kind = key.partition(",")
            table.setdefault(task, {})[metric if kind in ("", "none") else f"{metric} ({kind})"] = float(value)
    return table


def compare_rows(a: dict, b: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    rows = []
    for task in sorted(set(a) | set(b)):
        for metric in sorted(set(a.get(task, {})) | set(b.get(task, {}))):
            va, vb = a.get(task, {}).get(metric), b.get(task, {}).get(metric)
            rows.append((task, metric, va, vb, None if va is None or vb is None else vb - va))
    return rows


def format_compare(rows, a_name: str, b_name: str) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e6 else f"{v:.4g}"
    lines = [f"A = {a_name}", f"B = {b_name}", "", "| task | metric | A | B | B - A |", "|---|---|---:|---:|---:|"]
    lines += [f"| {t} | {m} | {cell(va)} | {cell(vb)} | {'-' if d is None else f'{d:+.4f}'} |"
              for t, m, va, vb, d in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def _limit(text: str) -> float | int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 else value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m samba.zeroshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a Samba model directory (it records its tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--head", choices=HEADS, default="main")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a directory of task YAML files (repeatable), e.g. benchmarks/zeroshot_tasks")
    parser.add_argument("--limit", type=_limit, default=None, help="documents per task (< 1: a fraction); for tests")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per scoring batch (default %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=0,
                        help="> 0: rows per batch = this // the batch's padded length, instead of --batch-size")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="context window (default %(default)s)")
    parser.add_argument("--output", default=None, help="write lm-eval's results, configs and versions as JSON")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run every batch eagerly")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval's bootstrap for the stderr of non-mean metrics (0: none)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory, if the model has none")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.max_length) < 1 or min(args.batch_tokens, args.bootstrap_iters) < 0:
        raise ConfigError("--batch-size and --max-length must be >= 1, --batch-tokens and --bootstrap-iters >= 0")
    return args


def run(argv: list[str]) -> dict:
    """The evaluation command: check, load, evaluate, print, write. Returns lm-eval's results."""
    from .model_files import require_model_dir

    args = parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ZeroShotError("--tasks names no task")
    include = [Path(p) for p in args.include_path]
    for path in include:
        if not path.is_dir():
            raise ZeroShotError(f"--include-path {path}: not a directory")
    if args.output:
        require_writable(args.output)
    require_model_dir(args.model_dir, "train")
    hub_ok = hub_can_serve()  # before lm-eval imports datasets
    check_sources(names, include, hub_ok)
    lm = SambaLM(args.model_dir, args.tokenizer, args.head, args.batch_size, args.batch_tokens, args.max_length,
                 args.device, args.precision, cuda_graphs=not args.no_cuda_graphs)
    results = evaluate_tasks(lm, names, include, hub_ok, args.limit, args.bootstrap_iters)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        write_results(args.output, results)
        logger.info("wrote %s", args.output)
    return results


def compare(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m samba.zeroshot compare",
                                     description="Metrics of two --output files side by side: A, B and B - A.")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    table = format_compare(compare_rows(read_metrics(args.a), read_metrics(args.b)), args.a, args.b)
    a, b = sample_counts(args.a), sample_counts(args.b)
    table += "".join(f"\nnote: {task}: A scored {a[task]} documents and B {b[task]}; the two are not the same test"
                     for task in sorted(set(a) & set(b)) if a[task] != b[task])
    print(table)
    return table


def sample_counts(path: str | Path) -> dict[str, int]:
    """task -> the number of documents scored (lm-eval's sample_len), from a ``--output`` file."""
    results = json.loads(Path(path).read_text())["results"]
    return {task: int(m["sample_len"]) for task, m in results.items() if isinstance(m.get("sample_len"), int)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":  # a model directory named 'compare' is ./compare
        compare(argv[1:])
    else:
        run(argv)


if __name__ == "__main__":
    # This copy's own main, unlike the other commands: importing the package's copy would register
    # a second class as lm-eval's "samba" model, which lm-eval refuses. Its errors are still the
    # classes the command line turns into one line (ZeroShotError is a samba.data.DataError).
    from samba.cli import run_stage

    run_stage("zeroshot", main)
