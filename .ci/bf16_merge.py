"""How much of an iteration's LoRA update a merge into bf16 weights loses, on the tiny world.

    python .ci/bf16_merge.py [LR ...]      # default: 3e-4 (the tiny world's) and 5e-6 (the LLMs')

For each learning rate: one iteration of the tiny world with bf16 weights on the CPU, LoRA rank 8.
Its adapters' intended update of every adapted weight, delta = (alpha / r) B A in fp32, is compared
with what adding it into the bf16 weights keeps, bf16(W + delta) - W (what irepo did before it kept
the adapters). Printed: the relative error of the kept update over all adapted weights, its cosine
with the intended one, and the mean |change of log pi| on pi_1's held-out samples, by the trained
policy and by the merged one.
"""
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import irepo  # noqa: E402



def measure(lr, out, warmup):
    flags = ["--out", out, "--iterations", "1", "--lora-rank", "8", "--lr", str(lr)]
    shutil.copytree(warmup, os.path.join(out, "warmup"))  # pi_0: the tiny warm-up, in fp32
    irepo.main(flags)
    args = irepo.parse_args(flags)
    cpu = torch.device("cpu")
    folder = os.path.join(out, "iteration_1")
    base, tokenizer = irepo.load_policy(args, cpu, args.warmup)
    trained, _ = irepo.load_exact(args, cpu, folder)
    merged, _ = irepo.load_policy(args, cpu, args.warmup)
    intended, kept = [], []
    with torch.no_grad():
        for name, module in irepo.lora_wrappers(trained):
            A, B, scale = module.frozen[0]
            delta = (scale * (B @ A)).T  # GPT-2's Conv1D stores W as (in, out)
            weight = merged.get_submodule(name).weight
            weight += delta.to(weight.dtype)  # the merge irepo made before
            intended.append(delta.flatten())
            kept.append((weight.float() - module.base.weight.float()).flatten())
    intended, kept = torch.cat(intended), torch.cat(kept)
    error = float((kept - intended).norm() / intended.norm())
    cosine = float(torch.nn.functional.cosine_similarity(kept, intended, dim=0))
    responses = irepo.read_json(os.path.join(folder, "eval.json"))["responses"]
    held_out = irepo.tiny_prompts()  # any prompts: the change of log pi is what is compared
    prompt_ids = [irepo.encode_prompt(tokenizer, held_out[i % len(held_out)])
                  for i in range(len(responses))]
    logps = {name: irepo.batched_logprobs(model, prompt_ids, responses, tokenizer.pad_token_id, 64)
             for name, model in (("base", base), ("trained", trained), ("merged", merged))}
    moved = float((logps["trained"] - logps["base"]).abs().mean())
    merged_moved = float((logps["merged"] - logps["base"]).abs().mean())
    print(f"lr {lr:g}: the merge keeps the update with relative error {error:.2f} (cosine "
          f"{cosine:.3f}); mean |change of log pi| {moved:.4f} trained, {merged_moved:.4f} merged")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        irepo.build_tiny(os.path.join(root, "warmup"), seed=0)
        irepo.DTYPE["cpu"] = torch.bfloat16  # from here on, pi is loaded as on a GPU
        for lr in [float(text) for text in sys.argv[1:]] or [3e-4, 5e-6]:
            measure(lr, os.path.join(root, f"lr{lr:g}"), os.path.join(root, "warmup"))
