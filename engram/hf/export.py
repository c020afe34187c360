"""A run's newest good checkpoint as a transformers folder: what `engram export-hf` writes and
what `engram serve` hands to vLLM."""

from __future__ import annotations

import json
import os
from pathlib import Path


def transformers_tokenizer(tok):
    """A tokenizers `Tokenizer` as a transformers fast tokenizer, with its pad/bos/eos roles."""
    from transformers import PreTrainedTokenizerFast

    from ..data.tokenizer import special_ids

    names = {f"{role}_token": tok.id_to_token(i) for role, i in special_ids(tok).items() if i is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, warn=print, overwrite: bool = False) -> Path:
    """Write `out` (config.json and generation_config.json with the tokenizer's bos/eos/pad
    ids, model.safetensors, the tokenizer, engram_run.json) from the
    run's newest checkpoint that verifies; staged, so `out` is never half-written. Returns the
    checkpoint it exported. An existing `out` must be an earlier export (and `overwrite` given)."""
    from ..data.tokenizer import special_ids
    from ..durable import staged_dir
    from ..runs import HF_RUN_FILE, check_output, checkpoint_identity, is_hf_folder, open_run, run_data
    from .modeling import EngramForCausalLM

    check_output(out, sources=[run], what="export-hf folder", own=is_hf_folder, overwrite=overwrite)
    model, run_info, ckpt = open_run(run, device="cpu", warn=warn)
    tok = run_data(run_info).tokenizer if run_info.get("data_dir") else None
    with staged_dir(out) as tmp:
        EngramForCausalLM.from_engram(model, None if tok is None else special_ids(tok)).save_pretrained(tmp)
        if tok is not None:
            transformers_tokenizer(tok).save_pretrained(tmp)
        info = {"train": run_info.get("train", {}), "data_dir": run_info.get("data_dir"), "source": str(ckpt),
                "source_weights_sha256": checkpoint_identity(ckpt)["weights_sha256"]}
        (tmp / HF_RUN_FILE).write_text(json.dumps(info, indent=1))
    return Path(ckpt)
