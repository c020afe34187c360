"""What the vLLM tests share: a small exported Engram model, engram's reference outputs, and a
vLLM engine that shuts down on exit. The model: a byte-level BPE tokenizer trained on
synthetic biographies, random weights with non-zero table rows and short-conv weights (so a
wrong n-gram or conv history changes the logits), written by the same code as `engram
export-hf`. Attention heads of width 32: the smallest vLLM's CPU attention supports."""

import gc
from pathlib import Path

import torch

from engram import EngramLM, generate
from engram.config import EngramConfig, ModelConfig, MoEConfig
from engram.data.synthetic_bios import synthetic_documents
from engram.data.tokenizer import train_tokenizer
from engram.hashing import CompressedTokenizer
from engram.runs import open_run


# A plain chat template, so the server's chat endpoint has one to apply.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def texts(n_people: int = 60) -> list[str]:
    return [d["text"] for d in synthetic_documents(n_people, seed=0)[1]]


def model_config(vocab: int, compressed: int, *, moe: bool, M: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=64, n_layers=3, n_heads=2, n_kv_heads=1, mlp_hidden_size=96,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=32, first_k_dense=1)
        if moe else None, n_streams=M, max_seq_len=512,
        engram=EngramConfig(compressed_vocab_size=compressed, pad_id=0, layer_ids=(0, 2), rows_per_head=(251, 257),
                            n_head_per_ngram=2, n_embed_per_ngram=16, conv_zero_init=False, table_init_std=1.0))


def train_briefly(model: EngramLM, tok, steps: int, seed: int) -> None:
    """A few Adam steps on the biographies, so greedy text repeats phrases of its context and
    prompt-lookup drafts are sometimes accepted (a random model never repeats)."""
    from engram.train.trainer import train_step

    ids = torch.tensor([i for t in texts() for i in tok.encode(t).ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        train_step(model, [opt], torch.stack([ids[s:s + 65] for s in starts.tolist()]))
    model.eval()


def write_folder(out: Path, *, moe: bool = False, M: int = 1, seed: int = 0, train_steps: int = 0) -> Path:
    """The folder `engram export-hf` would write for this model (config, weights, tokenizer)."""
    from engram.hf import EngramForCausalLM
    from engram.data.tokenizer import special_ids
    from engram.hf.export import transformers_tokenizer

    tok = train_tokenizer(texts(), vocab_size=400)
    compression = CompressedTokenizer.from_tokenizer(tok)
    config = model_config(tok.get_vocab_size(), len(compression), moe=moe, M=M)
    torch.manual_seed(seed)
    model = EngramLM(config, compression=compression).eval()
    with torch.no_grad():  # move the hyper-connection maps off their static init
        for name, p in model.named_parameters():
            if name.endswith((".phi", "alpha_pre", "alpha_post", "alpha_res")):
                p.normal_(0, 0.3)
            if name.endswith("short_conv.weight"):
                p.normal_(0, 0.5)
    if train_steps:
        train_briefly(model, tok, train_steps, seed)
    EngramForCausalLM.from_engram(model, special_ids(tok)).save_pretrained(out)
    hf_tok = transformers_tokenizer(tok)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return out


LOGPROB_TOL = 2e-3  # float32 on both sides; measured differences are ~1e-5
NEW_TOKENS = 24


def bios_prompts(folder: Path, lengths) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = [i for t in texts()[40:] for i in tok.encode(t).ids]
    return [stream[7 * k: 7 * k + n] for k, n in enumerate(lengths)]


def reference(folder: Path, prompts: list[list[int]], n: int = NEW_TOKENS):
    """engram's greedy tokens and each token's log-probability from one full forward."""
    model = open_run(folder).model
    out = []
    for prompt in prompts:
        tokens = generate(model, [prompt], n, temperature=0)[0]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + tokens])).logits[0].float().log_softmax(-1)
        out.append((tokens, [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]))
    return out


class Engine:
    """A vLLM engine on a folder, shut down on exit (one engine at a time on these cores)."""

    def __init__(self, folder: Path, **kwargs) -> None:
        kwargs.setdefault("max_model_len", 512)
        import vllm

        self.llm = vllm.LLM(str(folder), dtype="float32", seed=0, enforce_eager=True, disable_log_stats=False,
                            **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    def generate(self, prompts, n: int = NEW_TOKENS, overlays=None):
        """Greedy outputs; `overlays`: each request's `engram_overlays` extra argument (None: none)."""
        import vllm

        params = [vllm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0,
                                      extra_args=None if o is None else {"engram_overlays": o})
                  for o in (overlays or [None] * len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs

    def metric(self, name: str) -> float:
        return sum(getattr(m, "value", 0) or 0 for m in self.llm.get_metrics() if m.name == name)


def assert_same(outs, expected) -> float:
    """Tokens equal; returns the largest log-probability difference (asserted below tolerance)."""
    worst = 0.0
    for out, (tokens, logps) in zip(outs, expected, strict=True):
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        for step, (token, ref) in enumerate(zip(tokens, logps)):
            worst = max(worst, abs(got.logprobs[step][token].logprob - ref))
    assert worst < LOGPROB_TOL, f"log-probabilities differ by {worst:.2e}"
    return worst


def write_overlay(folder: Path, prompt: list[int], out: Path, materialized: Path, seed: int) -> Path:
    """An overlay that rewrites the rows `prompt`'s last 12 tokens read in every Engram layer
    (new values, large enough to change greedy tokens), and the folder of the same model with
    those rows written into its tables (the materialized edit)."""
    from tokenizers import Tokenizer

    from engram.data.tokenizer import special_ids
    from engram.hf import EngramForCausalLM
    from engram.hf.export import transformers_tokenizer
    from engram.memory.overlay import Overlay, read_rows, rows_sha256
    from engram.runs import checkpoint_identity

    model = open_run(folder).model
    flat = model.hasher.hash(model.compress(torch.tensor([prompt])), check=False)
    gen = torch.Generator().manual_seed(seed)
    rows, before = {}, {}
    for layer in model.engram_layers:
        table = model.blocks[layer].engram.table
        r = (flat[layer][0, -12:] + table.offsets).flatten().unique()
        rows[layer] = (r, 3 * torch.randn(r.numel(), table.embedding_dim, generator=gen))
        before[layer] = rows_sha256(read_rows(table, r))
    overlay = Overlay(model.layout.to_dict(), checkpoint_identity(folder), rows, before)
    overlay.save(out)
    with torch.no_grad():
        for layer, (r, values) in rows.items():
            model.blocks[layer].engram.table.weight[r] = values
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    EngramForCausalLM.from_engram(model, special_ids(tok)).save_pretrained(materialized)
    transformers_tokenizer(tok).save_pretrained(materialized)
    return out
