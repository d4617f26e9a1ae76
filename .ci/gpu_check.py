"""GPU check: one iteration of irepo.py on the full-size Phi-2 and Mistral-7B architectures.

Nothing can be downloaded on the GPU machine either, so the models are random-weight copies of
the real architectures (the published config sizes), saved to a temporary folder with a
word-level tokenizer as large as the vocabulary. Each runs one iteration of its preset (LoRA,
gradient checkpointing, bf16, SDPA) on a few prompts with simulated annotators, then this
script prints sampling tokens/s, training tokens/s, the share of the card's peak bf16 FLOP/s
reached in training, peak GPU memory over training and evaluation, and the sample batch that
--sample-batch-size auto chose; main() says what each measures.

    python .ci/gpu_check.py                 # on a GPU machine, about 10 minutes
    python .ci/gpu_check.py --scale tiny    # the same code path on a CPU, in a minute
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
IREPO = os.path.join(HERE, "..", "irepo.py")
sys.path.insert(0, os.path.dirname(IREPO))
import irepo  # noqa: E402  (the presets: LoRA or not, gradient checkpointing or not)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s

ARCHS = {  # the published sizes of microsoft/phi-2 and mistralai/Mistral-7B-v0.1
    "phi-2": ("PhiForCausalLM", "PhiConfig", dict(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)),
    "mistral-7b": ("MistralForCausalLM", "MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def build(preset, folder, scale):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    model_cls, config_cls, sizes = ARCHS[preset]
    if scale == "tiny":
        sizes = dict(sizes, **TINY, **({"num_key_value_heads": 2} if "num_key_value_heads" in sizes else {}))
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(sizes["vocab_size"] - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    config = getattr(transformers, config_cls)(**sizes, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)  # build in bf16 directly: a 7B model in fp32 is 29 GB
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    torch.set_default_dtype(torch.float32)
    n_params, n_matmul = sum(p.numel() for p in model.parameters()), matmul_params(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return n_params, n_matmul


def matmul_params(model):
    """N of the FLOP count: the parameters that multiply each token, all but the input embedding
    table (a lookup); the LM head, a width x vocabulary product per token, counts (once if tied).
    Phi-2 and Mistral have no position-embedding table (rotary)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied table is listed once
    return total if head is embedding else total - embedding.numel()


def flops_per_token(gradient_checkpointing, lora):
    """Training FLOPs per token, in units of N (matmul_params): forward 2; backward to the
    activations 2; backward to the weights 2, only when every weight trains (LoRA's base weights
    are frozen: no gradient; the adapters' own FLOPs, rank/width of a layer's, are left out);
    under gradient checkpointing the forward again, 2. So LoRA: 6 with checkpointing (the
    presets), 4 without; full fine-tuning: 8 with, 6 without. Left out, a few per cent each:
    attention's scores and weighted sums (4 x layers x context x width per token forward), and
    the LM head counted in the recomputed forward though checkpointing recomputes the decoder
    layers only (the two err in opposite directions)."""
    return 2 + 2 + (0 if lora else 2) + (2 if gradient_checkpointing else 0)


def utilization(metrics, n_params, peak, gradient_checkpointing, lora):
    """The share of `peak` FLOP/s that step 6 reached, from one metrics.jsonl row:
    train_tokens_per_s (the tokens step 6 ran forward and back, epochs x (2 x prompt + both
    responses) per pair, padding not counted, over seconds_train: step 6 alone, the reference
    pass has its own seconds_reference) x flops_per_token x n_params. None without a peak."""
    if not peak:
        return None
    per_token = flops_per_token(gradient_checkpointing, lora) * n_params
    return metrics["train_tokens_per_s"] * per_token / peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scale", choices=["full", "tiny"], default="full")
    p.add_argument("--prompts", type=int, default=32, help="prompts in the one iteration")
    args = p.parse_args()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
    print(f"device: {card}; peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for preset in ARCHS:
            folder = os.path.join(root, preset)
            tic = time.time()
            n_params, n_matmul = build(preset, folder, args.scale)
            print(f"{preset}: {n_params / 1e9:.2f} B parameters ({n_matmul / 1e9:.2f} B outside "
                  f"the input embedding) built in {time.time() - tic:.0f}s", flush=True)
            out = os.path.join(root, preset + "-out")
            cmd = [sys.executable, IREPO, "--model", folder, "--preset", preset, "--annotators", "sim",
                   "--out", out, "--prompts", "tiny", "--iterations", "1",
                   "--prompts-per-iteration", str(args.prompts),
                   "--eval-prompts", "8", "--max-new-tokens", "128" if args.scale == "full" else "8"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
                results[preset] = {"error": proc.stderr.strip().splitlines()[-1]}
                continue
            with open(os.path.join(out, "metrics.jsonl")) as f:
                m = json.loads(f.readline())
            settings = irepo.PRESETS[preset]
            mfu = utilization(m, n_matmul, peak,
                              gradient_checkpointing=settings["gradient_checkpointing"],
                              lora=settings["lora_rank"] > 0)
            # What each figure measures (irepo.py: run, sampled_pairs, sample_batch,
            # peak_memory_mb):
            results[preset] = dict(
                params_b=round(n_params / 1e9, 2),
                # Step 1 alone: the response tokens of the K samples per prompt (each cut at its
                # end; prompts, and what a batch generated after a response's end, not counted)
                # over seconds_sample (encoding, generate() in batches of sample_batch, decoding;
                # not the annotators, nor the evaluation's sampling).
                sample_tokens_per_s=round(m["sample_tokens_per_s"]),
                # Step 6 alone: epochs x (2 x prompt + both responses) per pair, over seconds_train.
                train_tokens_per_s=round(m["train_tokens_per_s"]),
                mfu=None if mfu is None else round(mfu, 3),  # step 6's FLOPs: see utilization
                # The highest CUDA allocation (max_memory_allocated: the allocator's cache not
                # counted) from the start of step 6 to the end of step 7, so training and the
                # evaluation (held-out sampling, log-probs); on a CPU the process's peak RSS over
                # its whole life.
                peak_memory_gb=round(m["peak_memory_mb"] / 1024, 1),
                seconds_sample=round(m["seconds_sample"], 1),
                seconds_reference=round(m["seconds_reference"], 1),  # step 5: one forward pass
                seconds_train=round(m["seconds_train"], 1),
                # Prompts per generate() call, K sequences each, chosen once after the policy's
                # weights load: half the free memory over one prompt's KV cache at
                # max_prompt_tokens + max_new_tokens, from irepo's line; on a CPU auto means 16.
                sample_batch=next((line.split()[2] for line in proc.stdout.splitlines()
                                   if line.startswith("sample batch:")), "16 (auto on a CPU)"))
            print(f"{preset}: {json.dumps(results[preset])}", flush=True)
    print(json.dumps({"device": card, "results": results}, indent=1))


if __name__ == "__main__":
    main()
