"""The runtime: a refusal-token GGUF in llama.cpp, the first-answer-token decision, then generation.

One prompt evaluation serves both the decision and the answer: the logits at the last prompt
position give p_k for every refusal token; the chosen answer-start token is then appended to
the same KV cache and decoding continues with llama.cpp's native sampler chain.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtlocal.errors import ContextFull, RtlocalError, UsageError
from rtlocal.runtime.metadata import RefusalInfo, read_refusal_info, scan_header
from rtlocal.runtime.policy import Decision, Mode, Policy, decide
from rtlocal.runtime.prompts import Message, PromptBuilder

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096
MAX_SEED = 0xFFFFFFFE  # llama.cpp's seeds are 32-bit and 0xFFFFFFFF means "random": -1 would silently be that


@dataclass
class SamplingParams:
    """llama.cpp's sampler chain settings for the answer (not for the refusal decision)."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-inf bans it)

    def __post_init__(self) -> None:
        """Out-of-range values are bad usage (exit 2), found before a model loads."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature (temperature) must be a number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails every comparison
            raise UsageError(f"--top-p (top_p) must be in (0,1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"--min-p (min_p) must be in [0,1], got {self.min_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k (top_k) must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise UsageError(f"--repeat-penalty must be a number > 0, got {self.repeat_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    completion_tokens: int = 0  # tokens after the answer-start token
    prompt_ms: float = 0.0  # prompt evaluation (the decision's only model cost)
    decision_ms: float = 0.0  # softmax + rule
    first_token_ms: float = 0.0  # from the call to the first text token
    decode_ms: float = 0.0
    stop_reason: str = ""  # "eos", "length", "context", "cancelled"

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


@dataclass
class Response:
    """One assistant turn: the decision is made before iteration; iterating streams the text."""

    decision: Decision
    start_token: int | None
    stats: Stats
    _chunks: Iterator[str] = field(repr=False, default=iter(()))
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            self.text += chunk
            yield chunk

    def finish(self) -> str:
        """Consume the stream; return the whole text."""
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop generating (from the thread that iterates); the text so far stays in `text`."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class Engine:
    """A loaded GGUF model with its refusal-token contract."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = DEFAULT_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        verbose: bool = False,
    ):
        from llama_cpp import Llama

        path = Path(model_path).expanduser()
        if not path.is_file():
            raise RtlocalError(f"{model_path}: no such model file")
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        arch = scan_header(path, {"general.architecture"}).get("general.architecture", "")
        n_ctx_train = scan_header(path, {f"{arch}.context_length"}).get(f"{arch}.context_length")
        if n_ctx_train:
            n_ctx = min(n_ctx, int(n_ctx_train))  # beyond what the model was trained on, output degrades
        threads = n_threads or _default_threads()
        try:
            self.llm = Llama(
                str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                # prompt batches too: llama.cpp's default (every core) made --threads 1 evaluate prompts on two
                # threads, which on a busy machine spin-wait for each other (25 s for an 8-token prompt, measured)
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                n_batch=n_batch,
                logits_all=False,
                verbose=verbose,
            )
        except (ValueError, RuntimeError) as e:
            raise RtlocalError(f"llama.cpp cannot load {model_path}: {e}") from e
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._eog: dict[int, bool] = {}
        import llama_cpp

        self._one = (llama_cpp.llama_token * 1)()
        self._ctx = self.llm._ctx.ctx
        self._vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self._adopt_real_context()
        try:
            self.refusal: RefusalInfo = read_refusal_info(self.metadata, self._token_id, n_vocab=self.n_vocab)
        except RtlocalError as e:
            self.llm.close()
            raise RtlocalError(f"{path.name}: {e}") from None
        bos = self.llm._model.token_bos()
        add_bos = self.llm._model.add_bos_token() and bos >= 0
        self.prompts = PromptBuilder(
            self.metadata.get("tokenizer.chat_template"),
            self._tokenize,
            bos_token=self._piece(bos) if bos >= 0 else "",
            eos_token=self._piece(self.llm._model.token_eos()),
            add_bos_id=bos if add_bos else None,
        )
        self.closed = False

    def _adopt_real_context(self) -> int:
        """The context llama.cpp really allocated (it pads n_ctx, to 256 tokens today), made the engine's.

        llama-cpp-python sizes its token buffer by the n_ctx asked for, so a padded context would let
        generation run past that buffer; the buffer is grown to the real context, which is all used.
        """
        real = int(self.llm.n_ctx())
        if len(self.llm.input_ids) < real:
            self.llm.input_ids = np.zeros(real, dtype=np.intc)  # nothing is evaluated yet
        return min(real, len(self.llm.input_ids))

    # ------------------------------------------------------------------ tokens

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _piece(self, token: int, special: bool = True) -> str:
        return self.piece_bytes(token, special).decode("utf-8", "replace")

    def piece_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless special), cached per token."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:  # a longer piece: llama.cpp says how many bytes it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[key] = buf.raw[: max(n, 0)]
        return piece

    def _token_id(self, text: str) -> int | None:
        """The id of a control token by its exact text, or None."""
        ids = self._tokenize(text, True)
        return ids[0] if len(ids) == 1 else None

    def token_type(self, token: int) -> int:
        """llama.cpp's token attribute flags (LLAMA_TOKEN_ATTR_*)."""
        return int(self.llm._model.token_get_attr(token))

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, end of turn, ...), cached per token: it is asked once per decoded token."""
        eog = self._eog.get(token)
        if eog is None:
            import llama_cpp

            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    # ------------------------------------------------------------------ evaluation

    def _eval_prompt(self, ids: Sequence[int]) -> int:
        """Evaluate a prompt, reusing the longest cached prefix. Returns the number of reused tokens."""
        if len(ids) >= self.n_ctx:
            raise ContextFull(len(ids), self.n_ctx)
        cached = self.llm.input_ids[: self.llm.n_tokens]
        reuse = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(ids) - 1)  # always evaluate the last token: its logits are needed
        self.llm.n_tokens = reuse
        self.llm.eval(list(ids[reuse:]))
        return reuse

    def _decode_one(self, token: int) -> None:
        """Append one token to the KV cache: the hot path of generation, with no Python batch set-up."""
        import llama_cpp

        self._one[0] = token
        rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(self._one, 1))
        if rc != 0:
            raise RtlocalError(f"llama.cpp failed to decode (code {rc}): context full?")
        self.llm.input_ids[self.llm.n_tokens] = token
        self.llm.n_tokens += 1

    def last_logits(self) -> np.ndarray:
        """The logits of the last evaluated position (a live view into llama.cpp's buffer)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def scores(self, temperature: float = 1.0) -> tuple[dict[str, float], float]:
        """p_k per category and p_respond at the current position (full-vocabulary softmax)."""
        from rtlocal.runtime.policy import softmax

        info = self.refusal
        probs = softmax(self.last_logits(), temperature)
        per_cat = {c: float(probs[t]) for c, t in zip(info.categories, info.category_ids)}
        return per_cat, float(probs[info.respond_id]) if info.respond_id is not None else math.nan

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.prompts.build(messages)

    def decide(self, messages: Sequence[Message], policy: Policy, *, decision_temperature: float = 1.0) -> Decision:
        """Evaluate the prompt and apply the threshold rule (no generation)."""
        self._eval_prompt(self.prompt_ids(messages))
        probs, p_respond = self.scores(decision_temperature)
        return decide(probs, p_respond, policy)

    # ------------------------------------------------------------------ generation

    def respond(
        self,
        messages: Sequence[Message],
        policy: Policy,
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 512,
        decision_temperature: float = 1.0,
        on_token: Callable[[int], None] | None = None,
    ) -> Response:
        """Decide, append the answer-start token, and return a Response that streams the answer.

        `on_token(id)` is called for each answer token while its position's logits are still readable
        (`last_logits()`), before the token is evaluated: the server reads logprobs there.
        """
        sampling = sampling or SamplingParams()
        t0 = time.perf_counter()
        ids = self.prompt_ids(messages)
        stats = Stats(prompt_tokens=len(ids))
        stats.cached_tokens = self._eval_prompt(ids)
        t1 = time.perf_counter()
        stats.prompt_ms = (t1 - t0) * 1000
        sampler = _SamplerChain(self, sampling)
        banned = _SamplerChain.ban(self, self.refusal.start_ids) if self.refusal.present else None
        first: int | None = None  # a sampled first text token (bias/free mode without an answer token)
        info = self.refusal
        if not info.present:
            decision = Decision(False, None, {}, math.nan, Mode.FREE)
            start = None
        elif policy.mode is Mode.THRESHOLD:
            probs, p_respond = self.scores(decision_temperature)
            decision = decide(probs, p_respond, policy)
            start = info.token_for(decision.category) if decision.refused else info.respond_id
        else:
            probs, p_respond = self.scores(decision_temperature)
            if policy.mode is Mode.BIAS:
                logits = self.last_logits()  # biased in place: llama.cpp's sampler reads this buffer
                for c, t in zip(info.categories, info.category_ids):
                    logits[t] += policy.bias(c)
            tok = sampler.sample()
            category = info.category_of(tok)
            decision = Decision(category is not None, category, probs, p_respond, policy.mode)
            if tok in info.start_ids:
                start = tok
            else:
                start, first = None, tok
        stats.decision_ms = (time.perf_counter() - t1) * 1000
        if start is not None:
            self._decode_one(start)
        if banned is not None:  # answer-start tokens are valid only at the first position
            sampler.prepend(banned)
        response = Response(decision, start, stats)
        response._chunks = self._stream(sampler, stats, max_tokens, t0, first, on_token)
        return response

    def _stream(
        self, sampler: "_SamplerChain", stats: Stats, max_tokens: int, t0: float, first: int | None,
        on_token: Callable[[int], None] | None = None,
    ) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t_start = time.perf_counter()
        n = 0
        stats.stop_reason = "length"
        try:
            while n < max_tokens:
                if self.llm.n_tokens >= self.n_ctx:
                    stats.stop_reason = "context"
                    break
                tok = first if first is not None else sampler.sample()
                first = None
                if self.is_eog(tok):
                    stats.stop_reason = "eos"
                    break
                n += 1
                if on_token is not None:
                    on_token(tok)
                text = decoder.decode(self.piece_bytes(tok))
                if n == 1:
                    stats.first_token_ms = (time.perf_counter() - t0) * 1000
                if text:
                    yield text
                if n < max_tokens:  # the last token needs no evaluation: nothing samples after it
                    self._decode_one(tok)
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        except (GeneratorExit, KeyboardInterrupt):
            stats.stop_reason = "cancelled"
            raise
        finally:
            stats.completion_tokens = n
            stats.decode_ms = (time.perf_counter() - t_start) * 1000
            sampler.close()

    def close(self) -> None:
        if not self.closed:
            self.llm.close()
            self.closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SamplerChain:
    """llama.cpp's native sampler chain: penalties, top-k, top-p, min-p, temperature, dist/greedy."""

    def __init__(self, engine: Engine, p: SamplingParams):
        import llama_cpp

        self._lib = llama_cpp
        self._ctx = engine._ctx
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if p.logit_bias:
            add(_SamplerChain.bias(engine, p.logit_bias))
        if p.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(engine.n_vocab, p.repeat_last_n, p.repeat_penalty, 0.0, 0.0))
        if p.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        add(llama_cpp.llama_sampler_init_dist(seed))

    @staticmethod
    def ban(engine: Engine, tokens: set[int]):
        """A logit-bias sampler that removes `tokens` (llama.cpp's own logit_bias sampler)."""
        return _SamplerChain.bias(engine, dict.fromkeys(tokens, -math.inf))

    @staticmethod
    def bias(engine: Engine, biases: dict[int, float]):
        """llama.cpp's logit_bias sampler: adds biases[t] to token t's logit."""
        import llama_cpp

        arr = (llama_cpp.llama_logit_bias * len(biases))()
        for i, t in enumerate(sorted(biases)):
            arr[i].token = t
            arr[i].bias = biases[t]
        return llama_cpp.llama_sampler_init_logit_bias(engine.n_vocab, len(biases), arr)

    def prepend(self, sampler) -> None:
        """Put `sampler` first in the chain (it must act before top-k and friends)."""
        lib = self._lib
        n = lib.llama_sampler_chain_n(self.chain)
        rest = [lib.llama_sampler_chain_remove(self.chain, 0) for _ in range(n)]
        lib.llama_sampler_chain_add(self.chain, sampler)
        for s in rest:
            lib.llama_sampler_chain_add(self.chain, s)

    def sample(self) -> int:
        return int(self._lib.llama_sampler_sample(self.chain, self._ctx, -1))

    def close(self) -> None:
        if self.chain is not None:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


