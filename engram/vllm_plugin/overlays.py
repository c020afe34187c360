"""Memory overlays chosen per request in vLLM.

The server loads named overlays at start (`--hf-overrides '{"engram_overlays": {"alice":
"DIR", ...}}'`, or `engram serve --overlay alice=DIR`); each is checked against the served
tables like `engram eval --overlay` (layout, parent, base rows). A request selects a stack
of them through vLLM's per-request extra arguments:
- OpenAI API: `"vllm_xargs": {"engram_overlays": "alice"}` (a list, or "a,b", stacks several,
  later ones winning where two change the same row);
- Python: `SamplingParams(extra_args={"engram_overlays": ["alice"]})`.
Requests with different overlays share one batch: every Engram table becomes a
`MixedOverlayTable` and each token reads through its own request's stack.

vLLM gives a model no per-request parameters, but it gives them to logits processors, keyed
by the request's row in the persistent batch: the same rows the model's tokens are laid out
by. `OverlaySelector` is such a processor (it leaves the logits alone); it tracks which rows
chose which overlays, and the model reads that before each forward. It is loaded in every
engine through the `vllm.logits_processors` entry point. vLLM 0.32 drops custom logits
processors under speculative decoding, so an engine with named overlays refuses that pairing.

vLLM's prefix cache keys a block by its tokens, LoRA and `cache_salt`; an overlay changes the
block's keys and values without vLLM knowing. `salt_prefix_cache_by_overlay` (run by the
plugin's `register()` in every vLLM process, the engine core's included) folds each request's
overlay choice into its cache salt where vLLM builds the request, so requests with the same
overlays share cached blocks and no other request does. Where that hook is missing (another
vLLM), the engine refuses prefix caching with overlays instead.
"""

from __future__ import annotations

import inspect

import torch

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

EXTRA_ARG = "engram_overlays"
_SELECTORS: dict[int, "OverlaySelector"] = {}  # id(VllmConfig) -> this worker's selector


def requested(params: SamplingParams | None) -> tuple[str, ...]:
    """The overlay names a request selects, in stack order ("" or absent: none)."""
    value = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARG)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{EXTRA_ARG} is an overlay name, a list of names or 'a,b'; got {value!r}")
    names = tuple(v.strip() for v in value)
    if len(set(names)) != len(names):
        raise ValueError(f"{EXTRA_ARG} names an overlay twice: {list(names)}")
    return names


class OverlaySelector(LogitsProcessor):
    """Which overlays each row of vLLM's persistent batch selected (logits unchanged)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        from ..hf.config import DECLARED_OVERLAY_NAMES

        try:
            names = requested(sampling_params)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter=EXTRA_ARG) from None
        unknown = [n for n in names if n not in DECLARED_OVERLAY_NAMES]
        if unknown:
            served = ", ".join(sorted(DECLARED_OVERLAY_NAMES)) or "none"
            raise VLLMValidationError(f"{EXTRA_ARG}: no overlay named {unknown[0]!r} is served (served: {served}); "
                                      "load it at start with --hf-overrides '{\"engram_overlays\": {NAME: DIR}}'",
                                      parameter=EXTRA_ARG, value=unknown[0])

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[str, ...]] = {}
        _SELECTORS[id(vllm_config)] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _p, _o: requested(params) or None)


def _salted_init(init):
    signature = inspect.signature(init)

    def init_with_overlay_salt(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        names = requested(bound.arguments.get("sampling_params"))
        if names:  # the salt enters the first block's hash, so every later block differs too
            salt = bound.arguments.get("cache_salt") or ""
            bound.arguments["cache_salt"] = f"{salt}\x00{EXTRA_ARG}={','.join(names)}"
        return init(*bound.args, **bound.kwargs)

    init_with_overlay_salt.engram_overlay_salt = True
    return init_with_overlay_salt


def prefix_cache_salted() -> bool:
    """Whether this vLLM builds requests where the overlay salt can be folded in."""
    from vllm.v1.request import Request

    params = inspect.signature(getattr(Request.__init__, "__wrapped_init__", Request.__init__)).parameters
    return "cache_salt" in params and "sampling_params" in params


def salt_prefix_cache_by_overlay() -> None:
    """Make vLLM's prefix cache tell overlays apart (idempotent; see the module docstring)."""
    from vllm.v1.request import Request

    if getattr(Request.__init__, "engram_overlay_salt", False) or not prefix_cache_salted():
        return
    original = Request.__init__
    Request.__init__ = _salted_init(original)
    Request.__init__.__wrapped_init__ = original


def selector_for(vllm_config) -> OverlaySelector | None:
    return _SELECTORS.get(id(vllm_config))


class ServedOverlays:
    """The named overlays of one served model, and the per-token choice of each forward."""

    def __init__(self, names: list[str], tables: list) -> None:
        self.index = {name: k for k, name in enumerate(names)}
        self.tables = tables  # every Engram layer's MixedOverlayTable

    def choose(self, selector: OverlaySelector | None, request_T: torch.Tensor | None) -> None:
        """Give every table this forward's per-token stacks (the base where none is chosen)."""
        choice = None
        if selector is not None and selector.rows and request_T is not None:
            depth = max(len(v) for v in selector.rows.values())
            size = max(selector.rows) + 1  # sized by the selector, not by request_T: no device sync
            by_row = torch.full((size, depth), -1, dtype=torch.long)
            for row, names in selector.rows.items():
                unknown = [n for n in names if n not in self.index]
                if unknown:  # the front end checks names; this engine may serve fewer
                    raise ValueError(f"{EXTRA_ARG}: this engine serves no overlay named {unknown[0]!r}")
                by_row[row, :len(names)] = torch.tensor([self.index[n] for n in names])
            by_row = by_row.to(request_T.device)
            inside = (request_T < size).unsqueeze(-1)  # rows that chose nothing lie past the table
            choice = torch.where(inside, by_row[request_T.clamp(max=size - 1)], -1)
        for table in self.tables:
            table.choose(choice)
