"""
iREPO: implicit Reward pairwise difference based Empirical Preference Optimization.
A single-file reference implementation of arXiv 2405.15230 (Le, Shu, Nguyen, Hong, Tran, 2024),
https://arxiv.org/abs/2405.15230

The method, one iteration t at a time (pi_t is the current policy and also the reference):
  1. sample K responses per prompt from pi_t;
  2. a panel of N annotators votes on every pair of them;
  3. rank the K responses by Zermelo (Bradley-Terry maximum-likelihood) scores, keep best vs worst;
  4. the panel's vote share on that pair is the empirical preference p_hat (a soft label);
  5. log pi_t of both responses is computed once, without gradients;
  6. minimize  ( beta*[log pi/pi_t (best) - log pi/pi_t (worst)] - logit p_hat )^2 ;
  7. evaluate pi_{t+1} against the initial policy pi_0 on held-out prompts.

Run it:
  python irepo.py                      # built-in tiny model and simulated panel, CPU, about a minute
  python irepo.py --loss dpo           # the same run with DPO on the panel's majority vote
  python irepo.py --loss ipo           # ... or with IPO's constant target
  python irepo.py --theory             # check the paper's theory numerically, in seconds
  pytest -q test_irepo.py              # the tests

Deliberate deviations from the paper (the README explains each):
  1. The paper's body could not be consulted; the loss and the loop are reconstructed from its
     abstract, its reviews and the authors' public training artifacts.
  2. p_hat is smoothed by adding `smoothing` (0.5) votes to each side (Haldane-Anscombe), so that a
     unanimous panel still has a finite logit; the paper does not say how it handles p_hat in {0, 1}.
  3. The soft label of the best-vs-worst pair reuses the votes that ranked it (no fresh votes).
  4. The default panel is simulated: Bradley-Terry annotators with a hidden reward (they like
     positive words), so that the true reward of a policy can be measured.
  5. Log-probabilities are summed over response tokens and scored at temperature 1, whatever the
     sampling temperature; dropout is off in training so that pi_theta = pi_t at step 0.
  6. IPO is run as the same squared loss with the constant target 1/2 on the beta*h scale, i.e.
     IPO's loss times beta^2, so that one learning rate serves all three losses.
"""

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------------------------
# Configuration. Presets are data; every value in a preset can be overridden by its flag.
# ---------------------------------------------------------------------------------------------

PRESETS = {
    "tiny": dict(  # the built-in default: a word-level GPT-2 trained for seconds on a toy corpus
        iterations=3, num_responses=4, num_annotators=8, beta=1.0, lr=3e-4, batch_size=16,
        micro_batch_size=16, epochs=4, max_new_tokens=20, temperature=1.0, warmup_ratio=0.1,
        prompts_per_iteration=192, eval_prompts=64, eval_samples=4, sample_batch_size=128,
    ),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, instead of usage + message
        fail(message)


def fail(message):
    """Stop before any work: one line on stderr, exit status 2, no traceback."""
    print(f"irepo.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = Parser(description="iREPO: iterative alignment by regression on empirical preferences.")
    a = p.add_argument
    # what to run
    a("--model", default="tiny", help="'tiny' (built in, offline) or a Hugging Face name or folder")
    a("--out", default="out", help="output folder: iterations, pairs, metrics")
    a("--prompts", default=None, help="FILE: .txt (one prompt a line) or .jsonl with a 'prompt' field")
    a("--loss", default="irepo", choices=["irepo", "dpo", "ipo"], help="objective (same family)")
    a("--seed", type=int, default=0, help="seeds every random stream")
    a("--theory", action="store_true", help="print the numerical checks of the paper's theory, exit")
    a("--compare", action="store_true", help="run irepo, dpo and ipo on 3 seeds each; print a table")
    # the method (None: the preset's value)
    a("--iterations", type=int, help="T, the number of iterations (fresh prompts each)")
    a("--num-responses", type=int, help="K, responses sampled per prompt")
    a("--num-annotators", type=int, help="N, annotators in the panel; each votes once per pair")
    a("--beta", type=float, help="beta, the KL strength in r = beta*log(pi/pi_ref)")
    a("--smoothing", type=float, default=0.5, help="votes added to each side of p_hat")
    a("--sharpness", type=float, default=1.0, help="s in the simulated votes sigma(s*(r_a - r_b))")
    # optimization
    a("--lr", type=float, help="Adam learning rate (cosine schedule with warm-up)")
    a("--warmup-ratio", type=float, help="share of the steps spent warming the learning rate up")
    a("--batch-size", type=int, help="pairs per optimizer step")
    a("--micro-batch-size", type=int, help="pairs per forward pass (gradient accumulation)")
    a("--epochs", type=int, help="passes over each iteration's pairs")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    # sampling and evaluation
    a("--max-new-tokens", type=int, help="longest response, in tokens")
    a("--temperature", type=float, help="sampling temperature (scoring always uses 1)")
    a("--prompts-per-iteration", type=int, help="size of each iteration's prompt chunk")
    a("--eval-prompts", type=int, help="held-out prompts for the win-rate against pi_0")
    a("--eval-samples", type=int, help="responses per held-out prompt, for less noisy estimates")
    a("--sample-batch-size", type=int, help="prompts per generate() call")
    a("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    args = p.parse_args(argv)

    for key, value in PRESETS["tiny"].items():  # fill what the flags left unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    checks = [
        ("--beta", args.beta > 0, "must be > 0"),
        ("--iterations", args.iterations >= 1, "must be >= 1"),
        ("--num-responses", args.num_responses >= 2, "must be >= 2 (a pair needs two responses)"),
        ("--num-annotators", args.num_annotators >= 1, "must be >= 1"),
        ("--smoothing", args.smoothing > 0, "must be > 0, or a unanimous panel has an infinite logit"),
        ("--sharpness", args.sharpness >= 0, "must be >= 0"),
        ("--lr", args.lr > 0, "must be > 0"),
        ("--warmup-ratio", 0 <= args.warmup_ratio < 1, "must be in [0, 1)"),
        ("--batch-size", args.batch_size >= 1, "must be >= 1"),
        ("--micro-batch-size", args.micro_batch_size >= 1, "must be >= 1"),
        ("--epochs", args.epochs >= 1, "must be >= 1"),
        ("--max-grad-norm", args.max_grad_norm > 0, "must be > 0"),
        ("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
        ("--temperature", args.temperature > 0, "must be > 0"),
        ("--prompts-per-iteration", args.prompts_per_iteration >= 1, "must be >= 1"),
        ("--eval-prompts", args.eval_prompts >= 1, "must be >= 1"),
        ("--eval-samples", args.eval_samples >= 1, "must be >= 1"),
        ("--sample-batch-size", args.sample_batch_size >= 1, "must be >= 1"),
    ]
    for flag, ok, why in checks:
        if not (ok and math.isfinite(getattr(args, flag[2:].replace("-", "_")))):
            fail(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {why}")
    args.micro_batch_size = min(args.micro_batch_size, args.batch_size)
    args.warmup = os.path.join(args.out, "warmup")  # where the tiny model's warm-up is cached
    return args


# ---------------------------------------------------------------------------------------------
# Device and dtype, in one place.
# ---------------------------------------------------------------------------------------------

def pick_device(name=None):
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# The tiny world: a toy language of reviews, its prompts, and the annotators' hidden reward.
# The simulated annotators like positive words: each one in a response adds 1 to its hidden
# reward, each negative word subtracts 1. A warm-up on random reviews (a stand-in for the SFT
# model the paper starts from) gives pi_0 with about as many negative words as positive ones.
# ---------------------------------------------------------------------------------------------

TOPICS = ("food movie hotel book game park song class trip room "
          "city show beach team car phone cafe museum concert garden").split()
QUALIFIERS = ["", "old ", "new ", "big ", "small ", "local ", "first ", "last "]
VERBS = ["describe", "review", "tell me about", "write about"]
ASPECTS = "staff price view music story ending service crowd weather start".split()
POSITIVE = "great good lovely wonderful fun amazing".split()
NEGATIVE = "bad awful boring terrible dull poor".split()
NEUTRAL = "fine okay long quiet busy usual".split()
SPECIALS = ["<pad>", "<eos>", "<unk>", "<reply>"]
TINY_PROMPT_FORMAT = "{prompt} <reply>"


def hidden_reward(text):
    """The simulated annotators' reward: (# positive words) - (# negative words)."""
    words = text.split()
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def tiny_prompts():
    """The 640 built-in prompts, e.g. 'review the old hotel'."""
    return [f"{v} the {q}{t}" for v in VERBS for q in QUALIFIERS for t in TOPICS]


def tiny_review(prompt, gen):
    """A random review of the prompt's topic, 1 to 3 clauses, adjectives drawn uniformly."""
    adjectives = POSITIVE + NEGATIVE + NEUTRAL
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]
    clauses = [f"the {prompt.split()[-1]} was {pick(adjectives)}"]
    for _ in range(int(torch.randint(3, (1,), generator=gen))):
        clauses.append(f"the {pick(ASPECTS)} was {pick(adjectives)}")
    return " and ".join(clauses) + " ."


def build_tiny(folder, seed=0, steps=600):
    """Build the tiny policy (word-level tokenizer + 2-layer GPT-2), fit it to random reviews
    (the warm-up, our stand-in for SFT), save it to `folder` and return it. Offline, ~20 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted(set(" ".join(tiny_prompts() + TOPICS + ASPECTS + POSITIVE + NEGATIVE + NEUTRAL
                                + ["the was and ."]).split()))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=["<reply>"])
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"],
                        pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    prompts = tiny_prompts()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in tqdm(range(steps), desc="warm-up (tiny SFT)", leave=False):
        batch = [prompts[int(i)] for i in torch.randint(len(prompts), (64,), generator=gen)]
        prompt_ids = [encode_prompt(tokenizer, p) for p in batch]
        response_ids = [tokenizer(tiny_review(p, gen), add_special_tokens=False)["input_ids"]
                        + [tokenizer.eos_token_id] for p in batch]
        ids, attn, resp = collate(prompt_ids, response_ids, tokenizer.pad_token_id, "cpu")
        loss = -sequence_logprobs(model, ids, attn, resp).sum() / resp.sum()  # SFT: mean NLL
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Prompts: the built-in list or a file, split into a held-out set and one chunk per iteration.
# ---------------------------------------------------------------------------------------------

def read_prompts(path):
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ('prompt' field).
    Any problem stops the run with the file and line named."""
    if not os.path.isfile(path):
        fail(f"--prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        fail(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{number}: malformed JSON ({e.msg})")
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            fail(f"{path}:{number}: needs a non-empty string field 'prompt'")
        prompts.append(row["prompt"].strip())
    if not prompts:
        fail(f"--prompts {path}: the file holds no prompt")
    return prompts


def split_prompts(prompts, args):
    """Held-out prompts first, then T disjoint chunks, after a seeded shuffle."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    prompts = [prompts[int(i)] for i in order]
    held_out, rest = prompts[:args.eval_prompts], prompts[args.eval_prompts:]
    if len(rest) < args.iterations:
        fail(f"--eval-prompts {args.eval_prompts}: leaves {len(rest)} of {len(prompts)} prompts "
             f"for {args.iterations} iterations; lower it or give more prompts")
    size = min(args.prompts_per_iteration, len(rest) // args.iterations)
    return held_out, [rest[t * size:(t + 1) * size] for t in range(args.iterations)]


# ---------------------------------------------------------------------------------------------
# Model loading.
# ---------------------------------------------------------------------------------------------

def load_policy(args, device):
    """The tiny model (built and warmed up once, then cached in --out) or a pretrained one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = args.warmup if args.model == "tiny" else args.model
    if args.model == "tiny" and not os.path.isfile(os.path.join(folder, "config.json")):
        build_tiny(folder + ".tmp", seed=0)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(folder + ".tmp", folder)  # a half-written warm-up is never reused
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: cannot be loaded ({str(e).splitlines()[0]}); "
             "use --model tiny or a local folder")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # responses end at the first EOS anyway
    model.eval()  # dropout stays off throughout, so that pi_theta == pi_t at the first step
    return model, tokenizer


def encode_prompt(tokenizer, prompt):
    """Token ids of a prompt, in the tokenizer's chat template if it has one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = TINY_PROMPT_FORMAT.format(prompt=prompt)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Log-probabilities. The one place that owns shifting, masking and the fp32 upcast.
# ---------------------------------------------------------------------------------------------

def collate(prompt_ids, response_ids, pad_id, device):
    """Lay out rows as [pad.. prompt | response ..pad]: prompts left-padded (as generate() sees
    them), responses right-padded, the width trimmed to this batch's longest prompt and response.
    Returns input_ids, attention_mask, response_mask, each (B, P + R)."""
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    B = len(prompt_ids)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
        resp[i, P:P + len(r)] = 1
    return ids.to(device), attn.to(device), resp.to(device)


def sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """log pi(y|x) summed over the response tokens, one value per row.

    Args:
        input_ids, attention_mask, response_mask: (B, T); response_mask is 1 on response tokens.
    Returns:
        (B,) float32 sums of log pi(token | everything before it) over the response tokens.
    """
    # Positions count real tokens only, so a left-padded row is scored exactly as it would be
    # alone; without this, HF models number the pads and shift every position.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # The logit at position i predicts token i+1. Responses sit at the right, so only the last
    # `keep` positions need the LM head: this skips the (B, T, V) logits of the prompts.
    first = int(response_mask.any(0).float().argmax()) if response_mask.any() else input_ids.shape[1] - 1
    first = max(first, 1)  # token 0 has nothing before it to predict it
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep, use_cache=False).logits[:, :-1]  # (B, T - first, V)
    targets = input_ids[:, first:]  # (B, T - first)
    mask = response_mask[:, first:].bool()
    # log softmax of the chosen token = its logit - logsumexp(all logits), in fp32. Gathering
    # first avoids a full (B, T, V) fp32 log-softmax; in bf16 the upcast is row by row.
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T - first)
    if logits.dtype == torch.float32:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    token_logps = torch.where(mask, chosen - lse, 0.0)  # where, not *: pad logits may be nan
    return token_logps.sum(-1)


@torch.no_grad()  # frozen: the reference pi_t and every evaluation
def batched_logprobs(model, prompt_ids, response_ids, pad_id, batch_size):
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        batch = collate(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size], pad_id,
                        model.device)
        out.append(sequence_logprobs(model, *batch))
    return torch.cat(out).cpu()


# ---------------------------------------------------------------------------------------------
# Sampling: K responses per prompt from the current policy, batched.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, tokenizer, prompt_ids, k, args, desc):
    """k responses for each prompt. Returns a list (len(prompt_ids) * k) of token-id lists,
    grouped by prompt; each ends at its first EOS (kept) or at max_new_tokens."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = []
    for i in tqdm(range(0, len(prompt_ids), args.sample_batch_size), desc=desc, leave=False):
        chunk = prompt_ids[i:i + args.sample_batch_size]
        ids, attn, _ = collate(chunk, [[]] * len(chunk), pad, model.device)
        ids, attn = ids[:, :-1], attn[:, :-1]  # collate leaves one response slot; drop it
        # top_k=0 and top_p=1 so that the samples come from pi_t itself (at this temperature).
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             num_return_sequences=k, pad_token_id=pad, eos_token_id=eos)
        for row in out[:, ids.shape[1]:].tolist():
            responses.append(row[:row.index(eos) + 1] if eos in row else row)
    return responses


# ---------------------------------------------------------------------------------------------
# Annotators. A panel answers, for each pair (a, b), N values in [0, 1]: each annotator's vote
# (or probability) that a is better than b.
# ---------------------------------------------------------------------------------------------

class SimulatedPanel:
    """N Bradley-Terry annotators sharing the hidden reward: each votes for a with probability
    sigma(sharpness * (r(a) - r(b))), independently of the others."""

    def __init__(self, n, sharpness, seed):
        self.n, self.sharpness = n, sharpness
        self.gen = torch.Generator().manual_seed(seed)

    def reward(self, texts):
        return torch.tensor([hidden_reward(t) for t in texts])

    def compare(self, prompts, texts_a, texts_b):  # -> (P, N) votes in {0, 1}
        p = torch.sigmoid(self.sharpness * (self.reward(texts_a) - self.reward(texts_b)))
        return torch.bernoulli(p[:, None].expand(-1, self.n), generator=self.gen)


# ---------------------------------------------------------------------------------------------
# Soft labels and ranking.
# ---------------------------------------------------------------------------------------------

def empirical_preference(votes_a, n_annotators, smoothing=0.5):
    """p_hat(a > b) = (votes for a + smoothing) / (N + 2 * smoothing).

    The paper's p_hat is the plain mean of the N votes; with few annotators it is often 0 or 1,
    whose logit is infinite. Adding half a vote to each side (Haldane-Anscombe) keeps it finite
    and makes the bias of logit(p_hat) O(1/N^2) instead of O(1/N)."""
    return (votes_a + smoothing) / (n_annotators + 2 * smoothing)


def preference_logit(p):
    """logit p = log p - log(1 - p): the reward difference that Bradley-Terry assigns to p."""
    return torch.log(p) - torch.log1p(-p)


def zermelo_scores(wins, prior=0.1, iters=500, tol=1e-9):
    """Bradley-Terry (Zermelo) maximum-likelihood log-strengths from win counts.

    Args:
        wins: (..., K, K); wins[..., i, j] = votes for i over j (may be fractional).
        prior: pseudo-votes added to every ordered pair, so an undefeated response gets a
            finite score (the MLE alone would send it to infinity).
    Returns:
        (..., K) log-strengths, centred to mean 0. Fitted by Zermelo's (1929) fixed point,
        the MM algorithm: gamma_i <- W_i / sum_j n_ij / (gamma_i + gamma_j).
    """
    k = wins.shape[-1]
    off = 1.0 - torch.eye(k, dtype=torch.float64)
    w = (wins.double() + prior) * off  # (..., K, K)
    n = w + w.transpose(-1, -2)  # comparisons between i and j
    total = w.sum(-1)  # W_i
    gamma = torch.ones(wins.shape[:-1], dtype=torch.float64)
    for _ in range(iters):
        new = total / (n / (gamma[..., :, None] + gamma[..., None, :])).sum(-1)
        new = new / torch.exp(torch.log(new).mean(-1, keepdim=True))  # fix the scale
        done = (new - gamma).abs().max() < tol
        gamma = new
        if done:
            break
    return torch.log(gamma).float()


# ---------------------------------------------------------------------------------------------
# Losses: pure functions, per pair. logratio = log pi_theta(y|x) - log pi_ref(y|x), summed over
# response tokens; h = beta * (logratio_a - logratio_b) is the implicit reward difference.
# ---------------------------------------------------------------------------------------------

def irepo_loss(logratio_a, logratio_b, target_logit, beta):
    """iREPO: squared error between the implicit reward difference and logit p_hat(a > b).

    Args: logratio_a, logratio_b, target_logit: (P,); beta > 0.
    Returns: (P,) losses  (beta * [logratio_a - logratio_b] - logit p_hat)^2.
    Its minimizer, with exact preferences, is pi_ref * exp(r / beta) / Z (see --theory)."""
    return (beta * (logratio_a - logratio_b) - target_logit) ** 2


def dpo_loss(logratio_a, logratio_b, target_logit, beta):
    """DPO on the panel's majority vote: the winner is a if logit p_hat >= 0, else b.
    Returns: (P,) losses  -log sigma(beta * [logratio_w - logratio_l])."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return -F.logsigmoid(sign * beta * (logratio_a - logratio_b))


def ipo_loss(logratio_a, logratio_b, target_logit, beta):
    """IPO: the iREPO regression with a constant target 1/2 towards the majority winner,
    i.e. IPO's (h - 1/(2 beta))^2 times beta^2, so that one learning rate serves all losses."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return (sign * beta * (logratio_a - logratio_b) - 0.5) ** 2


LOSSES = {"irepo": irepo_loss, "dpo": dpo_loss, "ipo": ipo_loss}


# ---------------------------------------------------------------------------------------------
# One iteration's steps 2-6, as functions the loop below calls in order.
# ---------------------------------------------------------------------------------------------

def annotate(panel, prompts, texts, k, smoothing):
    """Step 2-4: every pair of each prompt's k responses goes to the panel; Zermelo scores rank
    them; the best-vs-worst pair and its soft label are kept.
    Returns a list of dicts (one per prompt) with best, worst (indices), votes, p_hat, target."""
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    flat_p, flat_a, flat_b = [], [], []
    for q, prompt in enumerate(prompts):
        for i, j in pairs:
            flat_p.append(prompt)
            flat_a.append(texts[q * k + i])
            flat_b.append(texts[q * k + j])
    votes = panel.compare(flat_p, flat_a, flat_b).sum(-1).view(len(prompts), len(pairs))  # for a
    wins = torch.zeros(len(prompts), k, k)
    for m, (i, j) in enumerate(pairs):
        wins[:, i, j] = votes[:, m]
        wins[:, j, i] = panel.n - votes[:, m]
    scores = zermelo_scores(wins)  # (prompts, k)
    best, worst = scores.argmax(-1), scores.argmin(-1)
    votes_best = wins[torch.arange(len(prompts)), best, worst]
    p_hat = empirical_preference(votes_best, panel.n, smoothing)
    target = preference_logit(p_hat)
    return [dict(best=int(best[q]), worst=int(worst[q]), votes_a=float(votes_best[q]),
                 p_hat=float(p_hat[q]), target_logit=float(target[q]),
                 scores=[round(float(s), 4) for s in scores[q]]) for q in range(len(prompts))]


def train(model, pairs, ref_a, ref_b, args):
    """Step 6: minimize the chosen loss over the pairs, pi_t's log-probs (ref_a, ref_b) fixed.
    Returns the mean loss and the regression diagnostics of the last epoch, and tokens seen."""
    loss_fn = LOSSES[args.loss]
    pad = pairs["pad_id"]
    n = len(pairs["prompt_ids"])
    target = torch.tensor(pairs["target_logit"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    from transformers import get_cosine_schedule_with_warmup
    steps = math.ceil(n / args.batch_size) * args.epochs
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)
    tokens = 0
    bar = tqdm(total=steps, desc="train", leave=False)
    for epoch in range(args.epochs):
        h_all, loss_all = torch.zeros(n), torch.zeros(n)
        order = torch.randperm(n)
        for start in range(0, n, args.batch_size):
            batch = order[start:start + args.batch_size]
            for m in range(0, len(batch), args.micro_batch_size):
                idx = batch[m:m + args.micro_batch_size].tolist()
                # Both responses of every pair in one forward pass: rows [a_1..a_B, b_1..b_B].
                prompt_ids = [pairs["prompt_ids"][i] for i in idx] * 2
                response_ids = [pairs["a_ids"][i] for i in idx] + [pairs["b_ids"][i] for i in idx]
                ids, attn, resp = collate(prompt_ids, response_ids, pad, model.device)
                logps_a, logps_b = sequence_logprobs(model, ids, attn, resp).cpu().split(len(idx))
                logratio_a, logratio_b = logps_a - ref_a[idx], logps_b - ref_b[idx]
                losses = loss_fn(logratio_a, logratio_b, target[idx], args.beta)  # (micro,)
                (losses.sum() / len(batch)).backward()
                h_all[idx] = args.beta * (logratio_a - logratio_b).detach()
                loss_all[idx] = losses.detach()
                tokens += int(attn.sum())
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if not torch.isfinite(norm):
                raise FloatingPointError(f"non-finite gradient norm at epoch {epoch}")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss_all[batch].mean():.4f}")
    bar.close()
    return dict(loss=float(loss_all.mean()),
                regression_mse=float(((h_all - target) ** 2).mean()),
                sign_agreement=float((torch.sign(h_all) == torch.sign(target)).float().mean()),
                reward_margin=float(h_all.mean())), tokens


# ---------------------------------------------------------------------------------------------
# The iteration loop.
# ---------------------------------------------------------------------------------------------

def decode(tokenizer, responses):
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]


PHASES = {"sample": 1, "annotate": 2, "train": 3, "eval": 4}


def phase_seed(seed, iteration, phase):
    """Every phase of every iteration gets its own seed, so that its randomness does not depend
    on how much randomness the phases before it used (nor on Python's salted hash)."""
    return (seed * 1_000_003 + iteration * 101 + PHASES[phase]) % 2**31


def seed_phase(seed, iteration, phase):
    torch.manual_seed(phase_seed(seed, iteration, phase))


def run(args):
    """Steps 1-7 for t = 0..T-1. Returns the list of metrics dicts, one per iteration."""
    device = pick_device(args.device)
    prompts = read_prompts(args.prompts) if args.prompts else tiny_prompts()
    held_out, chunks = split_prompts(prompts, args)
    try:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, ".write-test"), "w").close()
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as e:
        fail(f"--out {args.out}: cannot be written ({e.strerror})")
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"device: {device}, {len(held_out)} held-out prompts, "
          f"{len(chunks)} chunks of {len(chunks[0])} prompts")

    model, tokenizer = load_policy(args, device)
    pad = tokenizer.pad_token_id
    panel = SimulatedPanel(args.num_annotators, args.sharpness, args.seed)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    open(metrics_path, "w").close()

    # pi_0 on the held-out prompts: one sample per prompt, kept for every later comparison.
    seed_phase(args.seed, 0, "eval")
    eval_ids = [encode_prompt(tokenizer, p) for p in held_out for _ in range(args.eval_samples)]
    eval_prompts = [p for p in held_out for _ in range(args.eval_samples)]
    initial = sample(model, tokenizer, eval_ids, 1, args, "sample pi_0")
    initial_texts = decode(tokenizer, initial)
    initial_logps = batched_logprobs(model, eval_ids, initial, pad, args.sample_batch_size)
    previous, previous_logps = initial, initial_logps  # samples of pi_t and their log pi_t
    print(f"pi_0: true reward {panel.reward(initial_texts).mean():.3f} on held-out prompts")

    history = []
    for t, chunk in enumerate(chunks):
        # 1. Sample K responses per prompt from pi_t.
        seed_phase(args.seed, t, "sample")
        tic = time.time()
        prompt_ids = [encode_prompt(tokenizer, p) for p in chunk]
        responses = sample(model, tokenizer, prompt_ids, args.num_responses, args, f"iter {t + 1} sample")
        texts = decode(tokenizer, responses)
        seconds_sample = time.time() - tic

        # 2-4. The panel votes on every pair; Zermelo ranking; best vs worst; soft label.
        tic = time.time()
        panel.gen.manual_seed(phase_seed(args.seed, t, "annotate"))
        k = args.num_responses
        labels = annotate(panel, chunk, texts, k, args.smoothing)
        rows, skipped = [], 0
        for q, lab in enumerate(labels):
            a, b = responses[q * k + lab["best"]], responses[q * k + lab["worst"]]
            text_a, text_b = texts[q * k + lab["best"]], texts[q * k + lab["worst"]]
            if lab["best"] == lab["worst"] or text_a == text_b or not text_a or not text_b:
                skipped += 1  # nothing to learn from a pair of equal (or empty) responses
                continue
            rows.append(dict(prompt=chunk[q], response_a=text_a, response_b=text_b, **lab,
                             n_annotators=panel.n, prompt_ids=prompt_ids[q], a_ids=a, b_ids=b))
        seconds_annotate = time.time() - tic
        if not rows:
            fail(f"iteration {t + 1}: every pair was degenerate (identical or empty responses)")
        pairs = dict(pad_id=pad, prompt_ids=[r["prompt_ids"] for r in rows],
                     a_ids=[r["a_ids"] for r in rows], b_ids=[r["b_ids"] for r in rows],
                     target_logit=[r["target_logit"] for r in rows])

        # 5. log pi_t of both responses, once, without gradients: pi_t is the reference, and
        #    these cached numbers are the only trace of it (no second model in memory).
        tic = time.time()
        ref_a = batched_logprobs(model, pairs["prompt_ids"], pairs["a_ids"], pad, args.micro_batch_size)
        ref_b = batched_logprobs(model, pairs["prompt_ids"], pairs["b_ids"], pad, args.micro_batch_size)
        for row, la, lb in zip(rows, ref_a.tolist(), ref_b.tolist()):
            row.update(logp_ref_a=la, logp_ref_b=lb)  # saved, so anyone can check them

        # 6. Minimize the loss over the pairs (the model becomes pi_{t+1}).
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seed_phase(args.seed, t, "train")
        for p in model.parameters():
            p.requires_grad_(True)
        fit, tokens = train(model, pairs, ref_a, ref_b, args)
        for p in model.parameters():
            p.requires_grad_(False)
        seconds_train = time.time() - tic

        # 7. Evaluate pi_{t+1}: win-rate against pi_0 and true reward on held-out prompts; KL.
        tic = time.time()
        seed_phase(args.seed, t, "eval")
        current = sample(model, tokenizer, eval_ids, 1, args, f"iter {t + 1} eval")
        current_texts = decode(tokenizer, current)
        win_rate = panel.compare(eval_prompts, current_texts, initial_texts).mean()
        # KL(pi_t || pi_{t+1}) and KL(pi_0 || pi_{t+1}) as sample means of log p - log q over
        # the held-out samples drawn from pi_t and pi_0 (unbiased; may come out < 0 by chance).
        kl_ref = (previous_logps - batched_logprobs(model, eval_ids, previous, pad, args.sample_batch_size)).mean()
        kl_init = (initial_logps - batched_logprobs(model, eval_ids, initial, pad, args.sample_batch_size)).mean()
        previous, previous_logps = current, batched_logprobs(model, eval_ids, current, pad, args.sample_batch_size)
        seconds_eval = time.time() - tic

        metrics = dict(
            iteration=t + 1, loss_type=args.loss, **fit,
            win_rate_vs_initial=float(win_rate),
            true_reward=float(panel.reward(current_texts).mean()),
            kl_to_reference=float(kl_ref), kl_to_initial=float(kl_init),
            target_logit_mean=sum(pairs["target_logit"]) / len(rows),
            response_tokens_mean=sum(map(len, responses)) / len(responses),
            eos_rate=sum(bool(r) and r[-1] == tokenizer.eos_token_id for r in responses) / len(responses),
            pairs=len(rows), skipped_pairs=skipped,
            seconds_sample=seconds_sample, seconds_annotate=seconds_annotate,
            seconds_train=seconds_train, seconds_eval=seconds_eval,
            train_tokens_per_s=tokens / seconds_train,
            peak_memory_mb=peak_memory_mb(device),
        )
        save_iteration(args.out, t + 1, model, tokenizer, rows, metrics)
        history.append(metrics)
        print(f"iter {t + 1} | loss {fit['loss']:.4f} | mse {fit['regression_mse']:.4f} "
              f"| sign {fit['sign_agreement']:.2f} | win {metrics['win_rate_vs_initial']:.3f} "
              f"| reward {metrics['true_reward']:+.3f} | kl_ref {metrics['kl_to_reference']:.3f} "
              f"| len {metrics['response_tokens_mean']:.1f} | sample {seconds_sample:.1f}s "
              f"annotate {seconds_annotate:.1f}s train {seconds_train:.1f}s "
              f"({metrics['train_tokens_per_s']:.0f} tok/s)")
    for prompt, before, after in list(zip(eval_prompts, initial_texts, current_texts))[::args.eval_samples][:3]:
        print(f"  {prompt!r}\n    pi_0: {before}\n    pi_{len(chunks)}: {after}")
    return history


def save_iteration(out, t, model, tokenizer, rows, metrics):
    """iteration_t/ holds the model, tokenizer and pairs; it is written under a temporary name
    and renamed when complete, and only then is its metrics row appended."""
    final = os.path.join(out, f"iteration_{t}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "pairs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")


# ---------------------------------------------------------------------------------------------
# The theory, checked numerically (python irepo.py --theory). A tabular world where everything
# is exact: X prompts, Y responses each, a reference pi_ref, true rewards r, Bradley-Terry
# preferences P(i > j) = sigma(r_i - r_j), and a policy that is a table of logits. It runs
# through the same irepo_loss, empirical_preference, preference_logit and zermelo_scores.
# ---------------------------------------------------------------------------------------------

def tabular_world(seed, prompts=4, responses=6):
    """log pi_ref (X, Y) and true rewards r (X, Y), float64, drawn from a seeded normal."""
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1)
    return log_ref, torch.randn(prompts, responses, generator=g, dtype=torch.float64)


def optimal_policy(log_ref, r, beta):
    """log pi* = log pi_ref + r / beta - log Z: the maximizer of E_pi[r] - beta KL(pi || pi_ref)."""
    return torch.log_softmax(log_ref + r / beta, -1)


def objective(log_pi, log_ref, r, beta):
    """J(pi) = E_pi[r] - beta KL(pi || pi_ref), per prompt."""
    pi = log_pi.exp()
    return (pi * r).sum(-1) - beta * (pi * (log_pi - log_ref)).sum(-1)


def kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def pair_weights(scheme, log_pi, r, k=4):
    """Probability of each pair (i < j) of a prompt under a pair-sampling scheme, (X, pairs):
    'uniform' every pair alike; 'on-policy' i and j drawn from pi; 'best-worst' the best and
    the worst of k draws from pi (with replacement), ranked by Zermelo scores of the exact
    preferences. Each gives every pair a positive probability."""
    X, Y = r.shape
    I, J = torch.triu_indices(Y, Y, 1)
    pi = log_pi.exp()
    if scheme == "uniform":
        return torch.ones(X, len(I), dtype=r.dtype)
    if scheme == "on-policy":
        return 2 * pi[:, I] * pi[:, J]
    prefs = torch.sigmoid(r[:, :, None] - r[:, None, :]) * (1 - torch.eye(Y, dtype=r.dtype))
    rank = zermelo_scores(prefs, prior=0.0).argsort(-1).argsort(-1)  # 0 = worst
    w = torch.zeros(X, len(I), dtype=r.dtype)
    for x in range(X):
        q = pi[x][rank[x].argsort()]  # probabilities in rank order, worst first
        mass = lambda lo, hi: q[lo:hi + 1].sum() if hi >= lo else q.new_zeros(())
        for m, (i, j) in enumerate(zip(I.tolist(), J.tolist())):
            lo, hi = sorted((int(rank[x, i]), int(rank[x, j])))
            # P(min rank = lo and max rank = hi) over k draws, by inclusion-exclusion.
            w[x, m] = (mass(lo, hi) ** k - mass(lo + 1, hi) ** k - mass(lo, hi - 1) ** k
                       + mass(lo + 1, hi - 1) ** k)
    return w


def fit_tabular(log_ref, targets, beta, weights_fn=None, rounds=3):
    """Minimize the expected iREPO loss sum_pairs w * irepo_loss over a table of logits,
    starting from pi_ref, with L-BFGS in float64. targets: (X, pairs) logits of p_hat(i > j).
    weights_fn(log_pi) gives the pair weights; it is re-evaluated each round (on-policy)."""
    Y = log_ref.shape[-1]
    I, J = torch.triu_indices(Y, Y, 1)
    theta = log_ref.clone().requires_grad_(True)
    for _ in range(rounds):
        w = weights_fn(torch.log_softmax(theta, -1).detach()) if weights_fn else torch.ones_like(targets)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logratio = torch.log_softmax(theta, -1) - log_ref  # (X, Y)
            loss = (w * irepo_loss(logratio[:, I], logratio[:, J], targets, beta)).sum() / w.sum()
            loss.backward()
            return loss
        opt.step(closure)
    return torch.log_softmax(theta, -1).detach()


def exact_targets(r):
    Y = r.shape[-1]
    I, J = torch.triu_indices(Y, Y, 1)
    return preference_logit(torch.sigmoid(r[:, I] - r[:, J]))


def theory_optimality(betas=(0.1, 0.5, 1.0), schemes=("uniform", "on-policy", "best-worst"), seed=0):
    """Claim 1: with exact preferences the minimizer is pi*. Returns {(beta, scheme): max error}."""
    log_ref, r = tabular_world(seed)
    out = {}
    for beta in betas:
        for scheme in schemes:
            log_pi = fit_tabular(log_ref, exact_targets(r), beta, lambda lp: pair_weights(scheme, lp, r))
            out[beta, scheme] = float((log_pi - optimal_policy(log_ref, r, beta)).abs().max())
    return out


def theory_annotators(ns=(1, 4, 16, 64, 256), seeds=20, beta=1.0, smoothing=0.5):
    """Claim 2: with N annotators per pair (votes ~ Binomial(N, P)), the suboptimality
    J(pi*) - J(pi_N) = beta KL(pi_N || pi*) falls as N grows. Returns {N: (mean gap, stderr,
    mean of J(pi*) - J(pi_N) computed directly)} over the seeds, one world per seed."""
    rows = {n: [] for n in ns}
    for seed in range(seeds):
        log_ref, r = tabular_world(1000 + seed)
        Y = r.shape[-1]
        I, J = torch.triu_indices(Y, Y, 1)
        p = torch.sigmoid(r[:, I] - r[:, J])
        g = torch.Generator().manual_seed(seed)
        star = optimal_policy(log_ref, r, beta)
        for n in ns:
            votes = torch.binomial(torch.full_like(p, float(n)), p, generator=g)
            targets = preference_logit(empirical_preference(votes, n, smoothing))
            log_pi = fit_tabular(log_ref, targets, beta, rounds=1)
            gap = float((beta * kl(log_pi, star)).mean())
            direct = float((objective(star, log_ref, r, beta) - objective(log_pi, log_ref, r, beta)).mean())
            rows[n].append((gap, direct))
    out = {}
    for n, vals in rows.items():
        gaps = torch.tensor([v[0] for v in vals])
        out[n] = (float(gaps.mean()), float(gaps.std() / len(gaps) ** 0.5), sum(v[1] for v in vals) / len(vals))
    return out


def theory_iterations(ts=(1, 2, 3), beta=1.0, seed=0):
    """Claim 3: T exact iterations with reference pi_t reach pi_0 exp(T r / beta) / Z.
    Returns {T: max |log pi_T - log pi*_{beta/T}|}."""
    log_ref, r = tabular_world(seed)
    out, log_pi = {}, log_ref
    for t in range(1, max(ts) + 1):
        log_pi = fit_tabular(log_pi, exact_targets(r), beta)  # pi_t is the next reference
        if t in ts:
            out[t] = float((log_pi - optimal_policy(log_ref, r, beta / t)).abs().max())
    return out


def theory_hard_labels(steps=4000, every=1000, beta=0.1, lr=1.0, prompts=8, seed=0):
    """Claim 4: one vote per pair. Each of `prompts` prompts has 4 responses and one labelled
    pair (0, 1) with a single Bradley-Terry vote. Plain gradient descent on DPO and on iREPO
    (target logit((1 + 0.5) / 2) for the winner) from pi_ref. Returns rows (step, DPO gap,
    iREPO gap, DPO's mean pi(y_l)), the gap being the mean log-ratio difference winner - loser."""
    log_ref, r = tabular_world(seed, prompts=prompts, responses=4)
    g = torch.Generator().manual_seed(seed)
    a_wins = torch.bernoulli(torch.sigmoid(r[:, 0] - r[:, 1]), generator=g)  # the single vote
    target = preference_logit(empirical_preference(a_wins, 1, 0.5))  # +-log 3
    sign = torch.where(target >= 0, 1.0, -1.0).double()
    thetas = {name: log_ref.clone().requires_grad_(True) for name in ("dpo", "irepo")}
    rows = []
    for step in range(steps + 1):
        gaps = {}
        for name, theta in thetas.items():
            logratio = torch.log_softmax(theta, -1) - log_ref
            gaps[name] = float((sign * (logratio[:, 0] - logratio[:, 1])).mean().detach())
            loss = LOSSES[name](logratio[:, 0], logratio[:, 1], target, beta).mean()
            grad, = torch.autograd.grad(loss, theta)
            with torch.no_grad():
                theta -= lr * grad * prompts  # per-prompt step size lr
        if step % every == 0:
            log_pi = torch.log_softmax(thetas["dpo"].detach(), -1)
            loser = torch.where(sign > 0, log_pi[:, 1], log_pi[:, 0]).exp().mean()
            rows.append((step, gaps["dpo"], gaps["irepo"], float(loser)))
    return rows


def theory_report():
    """Print one table per claim. Returns nothing; the tests assert the same functions."""
    tic = time.time()
    print("Claim 1. Exact preferences: the minimizer of the iREPO loss is pi* = pi_ref exp(r/beta)/Z")
    print("  max |log pi - log pi*| over 4 prompts x 6 responses")
    opt = theory_optimality()
    schemes = ("uniform", "on-policy", "best-worst")
    print(f"  {'beta':>6} " + " ".join(f"{s:>12}" for s in schemes))
    for beta in sorted({b for b, _ in opt}):
        print(f"  {beta:>6} " + " ".join(f"{opt[beta, s]:>12.1e}" for s in schemes))

    print("\nClaim 2. N annotators per pair: suboptimality J(pi*) - J(pi_N) = beta KL(pi_N || pi*)")
    print("  beta = 1, uniform pairs, smoothing 0.5, mean over 20 worlds")
    ann = theory_annotators()
    print(f"  {'N':>5} {'beta*KL':>10} {'+-stderr':>10} {'J*-J direct':>12}")
    for n, (gap, se, direct) in ann.items():
        print(f"  {n:>5} {gap:>10.5f} {se:>10.5f} {direct:>12.5f}")
    x = torch.tensor([math.log(n) for n in ann], dtype=torch.float64)
    y = torch.tensor([math.log(v[0]) for v in ann.values()], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    tail = float((y[-1] - y[-3]) / (x[-1] - x[-3]))
    print(f"  log-log slope: {slope:.2f} over all N, {tail:.2f} over N >= 16 (variance alone: -1)")

    print("\nClaim 3. T iterations with reference pi_t reach pi_0 exp(T r / beta) / Z (beta = 1)")
    print(f"  {'T':>3} {'max |log pi_T - log pi*_(beta/T)|':>36}")
    for t, err in theory_iterations().items():
        print(f"  {t:>3} {err:>36.1e}")

    print("\nClaim 4. One vote per pair: log-ratio gap (winner - loser) under gradient descent, beta = 0.1")
    print(f"  {'step':>6} {'DPO gap':>10} {'iREPO gap':>10} {'DPO pi(y_l)':>12}")
    for step, dpo, ire, loser in theory_hard_labels():
        print(f"  {step:>6} {dpo:>10.3f} {ire:>10.3f} {loser:>12.2e}")
    print(f"\n(theory checks took {time.time() - tic:.1f}s)")


def compare_losses(args, seeds=3):
    """Claim 5: the three losses on the tiny LM with the same seeds, panel and budget.
    Prints mean and standard deviation over the seeds of the last iteration's metrics."""
    finals = {}
    for loss in LOSSES:
        for s in range(seeds):
            sub = argparse.Namespace(**vars(args))
            sub.loss, sub.seed = loss, args.seed + s
            sub.out = os.path.join(args.out, "compare", f"{loss}_seed{sub.seed}")
            print(f"\n=== --loss {loss} --seed {sub.seed} ===")
            finals.setdefault(loss, []).append(run(sub)[-1])
    keys = ["true_reward", "kl_to_initial", "win_rate_vs_initial", "response_tokens_mean"]
    print(f"\nAfter {args.iterations} iterations, mean +- std over seeds "
          f"{args.seed}..{args.seed + seeds - 1}:")
    print(f"{'loss':<6}" + "".join(f"{k:>24}" for k in keys))
    for loss, rows in finals.items():
        cells = []
        for k in keys:
            v = torch.tensor([r[k] for r in rows])
            cells.append(f"{v.mean():.3f} +- {v.std():.3f}")
        print(f"{loss:<6}" + "".join(f"{c:>24}" for c in cells))
    return finals


def main(argv=None):
    args = parse_args(argv)
    if args.theory:
        return theory_report()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars are enough
    sys.stdout.reconfigure(line_buffering=True)  # metrics lines appear in order with the bars
    tic = time.time()
    if args.compare:
        return compare_losses(args)
    history = run(args)
    last = history[-1]
    rewards = " -> ".join(f"{m['true_reward']:+.2f}" for m in history)
    print(f"done in {time.time() - tic:.0f}s: win-rate vs pi_0 {last['win_rate_vs_initial']:.3f}, "
          f"true reward {rewards}; "
          f"outputs in {args.out}/")


if __name__ == "__main__":
    main()
