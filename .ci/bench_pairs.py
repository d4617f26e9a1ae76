"""Training speed on preference pairs: run by hand, not a test.

    python .ci/bench_pairs.py                               # this checkout's irepo.py
    mkdir -p /tmp/before && git show 15b7fd1:irepo.py > /tmp/before/irepo.py
    python .ci/bench_pairs.py --irepo /tmp/before/irepo.py  # the same calls on another version

256 random pairs (prompts of 12 to 38 tokens, responses of 20 to 60) and a random Llama of 7.2 M
parameters built from its config (8 layers, a vocabulary of 2,048, so that the LM head is a small
share of the work, as in real models); step 5 (reference_logprobs) and one epoch of step 6
(train) at batch 8, full fine-tuning, timed together. Prints pairs per second of wall clock and
of the process's CPU time (which other jobs on a shared machine disturb less), and the peak
resident memory. Compare versions on the same machine, interleaving their runs; --threads 1
steadies the figures on a busy machine.
"""

import argparse
import importlib.util
import os
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def load_irepo(path):
    """irepo.py from `path`, as a module."""
    spec = importlib.util.spec_from_file_location("irepo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_pairs(count, vocab_size, generator):
    """`count` pairs of random token ids, prompts 12-38 tokens long, responses 20-60."""
    def tokens(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()
    return [dict(prompt_ids=tokens(12, 38), a_ids=tokens(20, 60), b_ids=tokens(20, 60),
                 target_logit=float(torch.randn(1, generator=generator)))
            for _ in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--irepo", default=os.path.join(HERE, "..", "irepo.py"))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch's threads (unset: torch's choice)")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    irepo = load_irepo(options.irepo)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=656,
                         num_hidden_layers=8, num_attention_heads=4, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    config._attn_implementation = "sdpa"  # as irepo's load_policy loads every model
    model = LlamaForCausalLM(config).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    rows = random_pairs(options.pairs, config.vocab_size, torch.Generator().manual_seed(0))
    size = str(options.batch_size)
    args = irepo.parse_args(["--batch-size", size, "--micro-batch-size", size, "--epochs", "1"])
    tic, cpu_tic = time.perf_counter(), time.process_time()
    reference_a, reference_b = irepo.reference_logprobs(model, rows, 0, options.batch_size)
    seconds_reference = time.perf_counter() - tic
    irepo.train(model, rows, reference_a, reference_b, 0, args)
    seconds = time.perf_counter() - tic
    cpu_seconds = time.process_time() - cpu_tic  # all threads: less sensitive to other jobs
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux counts KiB
    print(f"{os.path.abspath(options.irepo)}: {parameters / 1e6:.1f} M parameters, "
          f"{len(rows)} pairs, batch {options.batch_size}, {torch.get_num_threads()} threads: "
          f"{len(rows) / seconds:.1f} pairs/s, {len(rows) / cpu_seconds:.1f} pairs per CPU "
          f"second (reference {seconds_reference:.1f} s, total {seconds:.1f} s), "
          f"peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
