"""Causal language models built from configs with random initialisation (nothing is ever downloaded).

:class:`TinyGPT` is a small GPT in plain torch: learned token and position embeddings, ``n_layer``
pre-norm blocks (``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``), a final norm and an untied
head. Its MLP is ``down(gelu(up(x)))`` with ``nn.Linear`` layers named ``up`` and ``down``, so the
MLP's hidden neurons are the output features of ``blocks.<i>.mlp.up`` (the units that neuron-level
localisation ranks). :func:`hf_causal_lm` builds a ``transformers`` GPT-2, GPT-NeoX (Pythia) or
Llama model of the same sizes with ``AutoModelForCausalLM.from_config`` (``transformers`` is
imported only then); :func:`build_lm` builds either from a run's model name (``gpt``,
``hf:gpt2``, ``hf:gpt_neox``, ``hf:llama``). :func:`lm_logits` runs either kind and returns (B, T, V)
logits; :func:`greedy_decode` continues prompts by greedy decoding (one full forward per new token).
:func:`suffix_measures` / :func:`sequence_measures` are the per-sequence suffix loss, token accuracy
and exact memorisation of teacher-forced logits (the analysis :func:`memloc.memorisation` and the
language-model trainer both use them).

These are not in the classifier registry (:mod:`memloc.core.models`): its models map
(B, *in_shape) inputs to (B, C) logits, a language model maps (B, T) tokens to (B, T, V).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MemlocError
from .precision import autocast
from .runtime import check_range

__all__ = ["TinyGPT", "HF_FAMILIES", "LM_MODELS", "hf_causal_lm", "hf_from_config", "hf_config_of", "is_lm_name",
           "build_lm", "lm_logits", "check_lm", "greedy_decode", "suffix_measures", "sequence_measures", "MEASURES",
           "LOGITS_BUDGET", "lm_rows"]

HF_FAMILIES = ("gpt2", "gpt_neox", "llama")
#: the language models a run names: the built-in TinyGPT and the transformers families
LM_MODELS = ("gpt",) + tuple(f"hf:{family}" for family in HF_FAMILIES)
#: the per-sequence measures of :func:`suffix_measures`
MEASURES = ("suffix_loss", "suffix_accuracy", "memorised")
#: bytes of float32 logits (rows x positions x vocabulary x 4) one evaluation forward of a language model may
#: hold: :func:`lm_rows` runs fewer rows than ``eval_batch_size`` where they would hold more (CONTRIBUTING.md,
#: "One vocabulary": a GPT-2 vocabulary at 64 positions is 12.9 MB a row, 13.2 GB for 1024 rows)
LOGITS_BUDGET = 2 ** 30


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` (one projection to queries, keys and values), ``proj``."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``down(gelu(up(x)))``: the hidden neurons are ``up``'s output features."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.act = nn.GELU()
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_mlp)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT: (B, T) int64 tokens -> (B, T, vocab_size) next-token logits (T <= ``max_len``).

    ``d_mlp`` defaults to ``4 * d_model``. Initialised as GPT-2 (normal, std 0.02; the projections
    into the residual stream, ``attn.proj`` and ``mlp.down``, std 0.02 / sqrt(2 n_layer); zero
    biases) from the global torch generator, or from ``seed`` when given (the global one untouched).
    """

    def __init__(self, vocab_size: int, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
                 d_mlp: int | None = None, max_len: int = 256, *, seed: int | None = None):
        super().__init__()
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        vocab_size, n_layer, n_head, d_model, d_mlp, max_len = _check_sizes(vocab_size, n_layer, n_head, d_model, d_mlp,
                                                                            max_len)
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_mlp) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if seed is None:
            self._init_weights(n_layer)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._init_weights(n_layer)

    def _init_weights(self, n_layer: int):
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name.split(".")[-2]:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens):
        if tokens.ndim != 2:
            raise MemlocError(f"tokens has shape {tuple(tokens.shape)}; give (B, T) token ids", argument="tokens")
        t = tokens.shape[1]
        if t > self.max_len:
            raise MemlocError(f"sequences of {t} tokens are longer than max_len = {self.max_len}", argument="tokens")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _check_sizes(vocab_size, n_layer, n_head, d_model, d_mlp, max_len) -> tuple[int, ...]:
    vocab_size, n_layer, n_head, d_model, d_mlp, max_len = (check_range(name, value, low=1, integer=True) for name, value in (
        ("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head), ("d_model", d_model), ("d_mlp", d_mlp),
        ("max_len", max_len)))
    if d_model % n_head:
        raise MemlocError(f"d_model {d_model} is not a multiple of n_head {n_head}", argument="d_model")
    return vocab_size, n_layer, n_head, d_model, d_mlp, max_len


def hf_causal_lm(family: str = "gpt2", vocab_size: int = 14, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
                 d_mlp: int | None = None, max_len: int = 256, seed: int = 0, **config) -> nn.Module:
    """A randomly initialised ``transformers`` causal LM: ``family`` gpt2 (``GPT2Config``), gpt_neox
    (``GPTNeoXConfig``, Pythia's architecture) or llama (``LlamaConfig``), built with
    ``AutoModelForCausalLM.from_config`` from ``seed`` (the global torch generator is untouched).

    Dropout is off; no BOS / EOS / pad ids are set (``config`` overrides any config field, e.g.
    ``eos_token_id=11``). ``d_mlp`` defaults to ``4 * d_model``. Returned in eval mode.
    """
    if family not in HF_FAMILIES:
        raise MemlocError(f"unknown model family {family!r}; valid: {', '.join(HF_FAMILIES)}", argument="family")
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    vocab_size, n_layer, n_head, d_model, d_mlp, max_len = _check_sizes(vocab_size, n_layer, n_head, d_model, d_mlp, max_len)
    import transformers
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family == "gpt2":
        kw = dict(vocab_size=vocab_size, n_positions=max_len, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                  n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = transformers.GPT2Config
    elif family == "gpt_neox":
        kw = dict(vocab_size=vocab_size, max_position_embeddings=max_len, hidden_size=d_model,
                  num_hidden_layers=n_layer, num_attention_heads=n_head, intermediate_size=d_mlp,
                  hidden_dropout=0.0, attention_dropout=0.0)
        cls = transformers.GPTNeoXConfig
    else:
        kw = dict(vocab_size=vocab_size, max_position_embeddings=max_len, hidden_size=d_model,
                  num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                  intermediate_size=d_mlp, attention_dropout=0.0)
        cls = transformers.LlamaConfig
    try:
        cfg = cls(**{**kw, **special, **config})
    except (TypeError, ValueError) as e:
        raise MemlocError(f"bad config for a {family} model: {e}", argument="config") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def hf_config_of(model) -> dict | None:
    """The config of a ``transformers`` model as a plain dict (what :func:`hf_from_config` rebuilds it
    from), None for any other module."""
    config = getattr(model, "config", None) if _is_hf(model) else None
    return None if config is None or not hasattr(config, "to_dict") else config.to_dict()


def hf_from_config(config: dict) -> nn.Module:
    """A randomly initialised ``transformers`` causal LM of ``config`` (:func:`hf_config_of`: any family
    that ``AutoModelForCausalLM`` knows, named by its ``model_type``), in eval mode; never downloaded."""
    config = dict(config)
    model_type = config.pop("model_type", None)
    import transformers
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()
    except (TypeError, ValueError, KeyError) as e:
        raise MemlocError(f"cannot build a transformers causal LM from the recorded config (model_type "
                          f"{model_type!r}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__})",
                          argument="config") from None


def is_lm_name(name) -> bool:
    """Does model name ``name`` denote a language model (``gpt`` or ``hf:<family>``)?"""
    return isinstance(name, str) and (name == "gpt" or name.startswith("hf:"))


def build_lm(name: str, *, vocab_size: int, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
             d_mlp: int | None = None, max_len: int = 256, seed: int = 0) -> nn.Module:
    """The randomly initialised language model ``name`` (:data:`LM_MODELS`) of these sizes, from ``seed``:
    ``gpt`` = :class:`TinyGPT`, ``hf:<family>`` = :func:`hf_causal_lm` (never downloaded)."""
    sizes = dict(n_layer=n_layer, n_head=n_head, d_model=d_model, d_mlp=d_mlp, max_len=max_len)
    if name == "gpt":
        return TinyGPT(vocab_size, **sizes, seed=seed)
    family = name[3:] if is_lm_name(name) else None
    if family not in HF_FAMILIES:
        raise MemlocError(f"unknown language model {name!r}; valid: {', '.join(LM_MODELS)}", argument="model")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MemlocError(f"model {name!r} needs the transformers package (pip install transformers)",
                          argument="model") from None
    try:
        return hf_causal_lm(family, vocab_size, seed=seed, **sizes)
    except MemlocError:
        raise
    except Exception as e:      # a config transformers accepts but cannot build a model from
        raise MemlocError(f"cannot build model {name!r} with these sizes ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})", argument="model") from None


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")


def lm_logits(model: nn.Module, tokens: torch.Tensor, *, call=None) -> torch.Tensor:
    """(B, T, V) next-token logits of ``tokens`` (B, T): ``model(tokens)`` if it returns a tensor,
    its ``.logits`` (``transformers`` models; called without a key-value cache) or its first item.
    ``call(*args, **kwargs)``: how to run ``model`` (e.g. a ``torch.func.functional_call``; default the model)."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise MemlocError(f"tokens has shape {tuple(tokens.shape)}; give (B, T) token ids", argument="tokens")
    call = model if call is None else call
    out = call(input_ids=tokens, use_cache=False) if _is_hf(model) else call(tokens)
    if not torch.is_tensor(out):
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out) or out.ndim != 3 or tuple(out.shape[:2]) != tuple(tokens.shape):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise MemlocError(f"model returned {shape} for tokens of shape {tuple(tokens.shape)}; a causal LM must give "
                          "(B, T, V) logits (a tensor or an output with .logits)", argument="model")
    return out


@torch.no_grad()
def check_lm(model: nn.Module, tokens: torch.Tensor, *, name: str = "model") -> int:
    """One forward of ``model`` (eval mode, its device) on two sequences of token 0 shaped as the rows of
    ``tokens`` (N, T) minus their last token; returns the logits per position V, or one
    :class:`MemlocError` when the model does not run on them, does not give (B, T, V) logits, or gives
    fewer than the largest token id of ``tokens`` needs."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        logits = lm_logits(model, torch.zeros_like(torch.as_tensor(tokens)[:2, :-1], device=device))
    except MemlocError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise MemlocError(f"{name} does not run on these sequences ({str(e).splitlines()[0][:200]})",
                          argument="model") from None
    finally:
        model.train(was_training)
    top = int(torch.as_tensor(tokens).max()) if torch.as_tensor(tokens).numel() else -1
    if logits.shape[-1] <= top:
        raise MemlocError(f"{name} gives {logits.shape[-1]} logits per position, but the sequences hold token ids "
                          f"up to {top}", argument="model")
    return int(logits.shape[-1])


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, n_tokens): the tokens greedy decoding appends to ``prompts`` (B, P), one full forward per
    token (no cache; ties go to the lowest token id, as ``argmax``)."""
    n_tokens = check_range("n_tokens", n_tokens, low=0, integer=True)
    x = torch.as_tensor(prompts)
    if x.ndim != 2 or x.shape[1] < 1:
        raise MemlocError(f"prompts has shape {tuple(x.shape)}; give (B, P) token ids with P >= 1", argument="prompts")
    start = x.shape[1]
    for _ in range(n_tokens):
        x = torch.cat([x, lm_logits(model, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[:, start:]


def suffix_measures(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int, suffix_len: int):
    """(suffix_loss, suffix_accuracy, memorised) tensors (B,) of teacher-forced ``logits`` (B, T', V)
    of ``tokens`` (B, T) (``logits[:, t]`` predicts ``tokens[:, t + 1]``; T' >= prefix_len + suffix_len - 1):
    the suffix's mean cross-entropy, the fraction of its tokens that are the argmax, and whether all are."""
    pred = logits[:, prefix_len - 1:prefix_len + suffix_len - 1]                   # (B, S, V)
    pred = pred if pred.dtype == torch.float64 else pred.float()                    # float64 stays float64
    target = tokens[:, prefix_len:prefix_len + suffix_len].to(pred.device)        # (B, S)
    loss = F.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(1)
    right = pred.argmax(-1) == target
    return loss, right.double().mean(1), right.all(1)


def lm_rows(model: nn.Module, eval_batch_size: int, positions: int) -> int:
    """Rows per evaluation forward of ``model`` on ``positions`` tokens a row: ``eval_batch_size``, or fewer
    (at least one) so that their float32 logits stay within :data:`LOGITS_BUDGET`. The vocabulary is
    ``model.vocab_size`` (:class:`TinyGPT`) or ``model.config.vocab_size`` (``transformers``); a model
    without either runs ``eval_batch_size`` rows."""
    vocab = getattr(model, "vocab_size", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return eval_batch_size
    return max(1, min(eval_batch_size, LOGITS_BUDGET // (4 * vocab * max(1, positions))))


@torch.no_grad()
def sequence_measures(model: nn.Module, tokens: torch.Tensor, prefix_len: int, suffix_len: int, *,
                      eval_batch_size: int = 1024, precision: str = "fp32") -> dict[str, np.ndarray]:
    """:data:`MEASURES` (numpy arrays (N,)) of ``model`` on every row of ``tokens`` (N, T), one
    teacher-forced forward per batch of ``eval_batch_size`` rows (fewer where their logits would exceed
    :data:`LOGITS_BUDGET`: :func:`lm_rows`) on the model's device, under ``precision`` autocast; the model
    runs as it is (put it in eval mode first)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = {k: [] for k in MEASURES}
    step = lm_rows(model, eval_batch_size, prefix_len + suffix_len - 1)
    for i in range(0, len(tokens), step):
        batch = tokens[i:i + step, :prefix_len + suffix_len].to(device)
        with autocast(precision, device):
            logits = lm_logits(model, batch[:, :-1])
        for key, value in zip(out, suffix_measures(logits, batch, prefix_len, suffix_len)):
            out[key].append(value.cpu())
    return {k: (torch.cat(v) if v else torch.zeros(0)).numpy() for k, v in out.items()}
