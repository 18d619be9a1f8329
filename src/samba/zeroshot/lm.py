"""``SambaLM``: a Samba model as an lm-eval ``LM``, registered as ``samba``.

It answers lm-eval's three kinds of request with a Samba model, from either head, with the
model's own ``sparsity_target`` applied: ``loglikelihood`` and ``loglikelihood_rolling`` (in
lm-eval's rolling windows of ``max_length`` tokens) through the ``Scorer``, ``generate_until``
through ``samba.generate`` with one kept ``Decoder`` (batch 1), stopped at the request's stop
strings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..config import ComputeConfig, ConfigError
from ..cuda_graphs import graphs_wanted
from ..data import TOKENIZER_FILE, load_tokenizer
from ..generate import HEADS, Decoder, generate
from ..model import Samba
from ..runtime import autocast_dtype, resolve_device
from .errors import ZeroShotError
from .scorer import Scorer

END_OF_TEXT = "<|endoftext|>"
MAX_LENGTH = 2048  # lm-eval's transformers backend uses this for models without a position limit (Mamba)
PRECISIONS = ("auto", "bf16", "fp32")  # compute.precision's values


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
