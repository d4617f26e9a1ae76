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

Part I of this file is the method, in the order above; Part II is the machinery, which changes
nothing in the method (command line, files, models, LoRA, other annotators, the tiny world, many
processes, runs that stop); Part III checks the theory and compares the losses.

Run it:
  python irepo.py                      # built-in tiny model and simulated panel, CPU, ~30 s
  python irepo.py --loss dpo           # the same with DPO on the majority vote (or --loss ipo)
  python irepo.py --theory             # check the paper's theory numerically, in seconds
  python irepo.py --compare            # reward-KL frontier of irepo, dpo and ipo, ~2.5 minutes
  python irepo.py --model microsoft/phi-2 --sft ultrachat.jsonl --prompts uf.jsonl       # GPU
  torchrun --nproc_per_node 8 irepo.py --model mistralai/Mistral-7B-v0.1 --sft ultrachat.jsonl \
      --prompts uf.jsonl               # 8 GPUs
  python -m pytest -q test_irepo.py    # the tests

Deliberate deviations from the paper (the README explains each):
  1. The loss and the loop are reconstructed from the abstract, reviews and public artifacts.
  2. p_hat is smoothed by adding `smoothing` (0.5) votes to each side (Haldane-Anscombe), so that
     a unanimous panel has a finite logit; the paper does not say how it handles p_hat in {0, 1}.
  3. The soft label of the best-vs-worst pair reuses the votes that ranked it (no fresh votes).
  4. The default panel is simulated (Bradley-Terry voters who like positive words), so that the
     true reward is known; the LLM presets use a public reward model (the paper's are unnamed).
  5. Log-probabilities are summed over response tokens and scored at temperature 1, whatever the
     sampling temperature; dropout is zeroed so that pi_theta = pi_t at the first step.
  6. IPO is run as the same squared loss with the constant target 1/2 on the beta*h scale, i.e.
     IPO's loss times beta^2, so that one learning rate serves all three losses.
  7. Where the paper is silent (K, lengths, temperature, LoRA rank) the presets choose (README).
"""

import contextlib
import errno
import functools
import json
import math
import operator
import os
import re
import resource
import shlex
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

# =============================================================================================
# PART I. THE METHOD, top to bottom in the order of the paper.
# =============================================================================================

# --- Settings. Each hyperparameter is declared once, here: name (the flag is --name, with dashes),
# type, valid range, its value in the built-in tiny world, and its meaning. The paper's Phi-2
# and Mistral-7B settings are overrides of those values; any flag overrides a preset.
SETTINGS = dict(  # name: (type, valid values, value in the tiny world, meaning)
    # the method
    loss=(str, ("irepo", "dpo", "ipo"), "irepo", "objective: iREPO, or DPO or IPO (same family)"),
    iterations=(int, ">= 1", 3, "T, the number of iterations (fresh prompts each)"),
    num_responses=(int, ">= 2 (a pair needs two responses)", 4, "K, responses per prompt"),
    num_annotators=(int, ">= 1", 8, "N, simulated annotators in 'sim'; one vote each per pair"),
    annotators=(str, None, "sim", "the panel, e.g. 'sim:8,judge:MODEL', 'rm:MODEL'"),
    beta=(float, "> 0", 1.0, "beta, the KL strength in r = beta*log(pi/pi_ref)"),
    smoothing=(float, "> 0 (a unanimous panel's logit is infinite)", 0.5, "votes added to p_hat"),
    sharpness=(float, ">= 0", 1.0, "s in the simulated votes sigma(s*(r_a - r_b))"),
    # optimization
    lr=(float, "> 0", 3e-4, "Adam learning rate (cosine schedule with warm-up)"),
    warmup_ratio=(float, ">= 0 and < 1", 0.1, "share of the steps that warm the lr up"),
    batch_size=(int, ">= 1", 16, "pairs per optimizer step"),
    micro_batch_size=(int, ">= 1", 16, "pairs per forward pass (gradient accumulation)"),
    epochs=(int, ">= 1", 4, "passes over each iteration's pairs"),
    max_grad_norm=(float, "> 0", 1.0, "gradient clipping"),
    lora_rank=(int, ">= 0 (0: full fine-tuning)", 0, "LoRA rank; 0 trains every weight"),
    lora_alpha=(float, ">= 0", 0, "LoRA alpha; the update is scaled by alpha / rank"),
    lora_targets=(str, None, "c_attn,c_proj,c_fc", "names of the linear layers to adapt"),
    gradient_checkpointing=(bool, None, False, "recompute activations to save memory"),
    # sampling and evaluation
    max_new_tokens=(int, ">= 1", 20, "longest response, in tokens"),
    max_prompt_tokens=(int, ">= 1", 64, "longer prompts keep their last tokens"),
    temperature=(float, "> 0", 1.0, "sampling temperature (scoring always uses 1)"),
    chat_format=(str, ("chatml", "mistral", "tiny"), "tiny", "if the tokenizer has no template"),
    prompts_per_iteration=(int, ">= 1", 192, "prompts in each iteration's chunk (None: all)"),
    eval_prompts=(int, ">= 1", 64, "held-out prompts for the win-rate against pi_0"),
    eval_samples=(int, ">= 1", 4, "responses per held-out prompt, for less noisy estimates"),
    sample_batch_size=(int, ">= 1, or auto", 128, "prompts per generate() call; auto: by memory"),
    sft_epochs=(int, ">= 1", 1, "passes of --sft over its conversations"),
    sft_lr=(float, "> 0", 2e-4, "learning rate of --sft"),
)
LLM = dict(  # what the paper's Phi-2 and Mistral-7B settings share; the README explains each
    beta=0.01, lr=5e-6, epochs=1, lora_rank=16, lora_alpha=32, gradient_checkpointing=True,
    max_new_tokens=256, max_prompt_tokens=512, temperature=0.7, prompts_per_iteration=None,
    eval_samples=1, sample_batch_size="auto",
    annotators="rm:OpenAssistant/reward-model-deberta-v3-large-v2")
PRESETS = {
    "tiny": {},  # the built-in default: a word-level GPT-2 trained for seconds on a toy corpus
    "phi-2": dict(LLM, batch_size=16, micro_batch_size=4, chat_format="chatml",
                  lora_targets="q_proj,k_proj,v_proj,dense,fc1,fc2"),
    "mistral-7b": dict(LLM, batch_size=8, micro_batch_size=2, chat_format="mistral",
                       lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
}

# --- Soft labels and ranking (steps 3-4).
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
        the MM algorithm: gamma_i <- W_i / sum_j games_ij / (gamma_i + gamma_j).
    """
    k = wins.shape[-1]
    off = 1.0 - torch.eye(k, dtype=torch.float64)
    w = (wins.double() + prior) * off  # (..., K, K)
    games = w + w.transpose(-1, -2)  # comparisons between i and j
    total = w.sum(-1)  # W_i
    gamma = torch.ones(wins.shape[:-1], dtype=torch.float64)
    for _ in range(iters):
        new = total / (games / (gamma[..., :, None] + gamma[..., None, :])).sum(-1)
        new = new / torch.exp(torch.log(new).mean(-1, keepdim=True))  # fix the scale
        done = (new - gamma).abs().max() < tol
        gamma = new
        if done:
            break
    return torch.log(gamma).float()

# --- Losses (step 6): pure functions, per pair, one signature. a is the best response and b the
# worst; logratio = log pi_theta(y|x) - log pi_t(y|x), summed over response tokens, and
# h = beta * (logratio_a - logratio_b) is the implicit reward pairwise difference.
def irepo_loss(logratio_a, logratio_b, target_logit, beta):
    """iREPO: squared error between the implicit reward difference and logit p_hat(a > b).

    Args: logratio_a (best), logratio_b (worst), target_logit = logit p_hat(a > b): (P,);
        beta > 0.
    Returns: (P,) losses  (beta * [logratio_a - logratio_b] - logit p_hat)^2.
    Its minimizer, with exact preferences, is pi_ref * exp(r / beta) / Z (see --theory)."""
    return (beta * (logratio_a - logratio_b) - target_logit) ** 2

def dpo_loss(logratio_a, logratio_b, target_logit, beta):
    """DPO on the panel's majority vote: the winner is a (the best) if logit p_hat >= 0, else b.
    Returns: (P,) losses  -log sigma(beta * [logratio_w - logratio_l])."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return -F.logsigmoid(sign * beta * (logratio_a - logratio_b))

def ipo_loss(logratio_a, logratio_b, target_logit, beta):
    """IPO: the iREPO regression with a constant target 1/2 towards the majority winner,
    i.e. IPO's (h - 1/(2 beta))^2 times beta^2, so that one learning rate serves all losses."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return (sign * beta * (logratio_a - logratio_b) - 0.5) ** 2

LOSSES = {"irepo": irepo_loss, "dpo": dpo_loss, "ipo": ipo_loss}

# --- Log-probabilities (steps 5-7). The one place that owns padding, positions, shifting, masking
# and the fp32 upcast.
def collate(prompt_ids, response_ids, pad_id, device):
    """Lay out rows as [pad.. prompt | response ..pad]: prompts left-padded (as generate() sees
    them), responses right-padded, the width trimmed to this batch's longest prompt and response.
    Returns input_ids, attention_mask, response_mask, each (B, P + R)."""
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    ids = torch.full((len(prompt_ids), P + R), pad_id, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
        resp[i, P:P + len(r)] = 1
    return ids.to(device), attn.to(device), resp.to(device)

def left_pad(prompt_ids, pad_id, device):
    """Prompts alone, left-padded to a common length: input_ids and attention_mask (B, P)."""
    ids, attn, _ = collate(prompt_ids, [[]] * len(prompt_ids), pad_id, device)
    return ids[:, :-1], attn[:, :-1]  # collate leaves one response slot; drop it

def last_logits(model, input_ids, attention_mask, keep):
    """The logits of the last `keep` positions, (B, keep, V), of left-padded rows. Positions
    count real tokens only, so a padded row is scored exactly as it would be alone; without
    this, HF models number the pads and shift every position."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=keep, use_cache=False).logits

def sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """log pi(y|x) summed over the response tokens, one value per row.

    Args:
        input_ids, attention_mask, response_mask: (B, T); response_mask is 1 on response tokens.
    Returns:
        (B,) float32 sums of log pi(token | everything before it) over the response tokens.
    """
    # The logit at position i predicts token i+1. Responses sit at the right, so only the last
    # `keep` positions need the LM head: this skips the (B, T, V) logits of the prompts.
    T = input_ids.shape[1]
    first = int(response_mask.any(0).float().argmax()) if response_mask.any() else T - 1
    first = max(first, 1)  # token 0 has nothing before it to predict it
    logits = last_logits(model, input_ids, attention_mask, T - first + 1)[:, :-1]  # (B, T-first, V)
    targets = input_ids[:, first:]  # (B, T - first)
    mask = response_mask[:, first:].bool()
    # log softmax of the chosen token = its logit - logsumexp(all logits), in fp32. Gathering
    # first avoids a full (B, T, V) fp32 log-softmax; the upcast is one row at a time.
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T - first)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    token_logps = torch.where(mask, chosen - lse, 0.0)  # where, not *: pad logits may be nan
    return token_logps.sum(-1)

@torch.no_grad()  # frozen: the reference pi_t and every evaluation
def batched_logprobs(model, prompt_ids, response_ids, pad_id, batch_size):
    prompt_ids, response_ids, out = shard(prompt_ids), shard(response_ids), []  # see shard()
    for i in range(0, len(prompt_ids), batch_size):
        batch = collate(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size], pad_id,
                        model.device)
        out += sequence_logprobs(model, *batch).tolist()
    return torch.tensor(gather(out))

# --- Sampling (step 1): K responses per prompt from the current policy, batched.
def as_messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

def encode_prompt(tokenizer, prompt, max_tokens=None):
    """Token ids of a prompt in the tokenizer's chat template (load_policy gives every tokenizer
    one). A prompt longer than max_tokens keeps its end, where the template asks for a reply."""
    text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has any BOS
    return ids[-max_tokens:] if max_tokens else ids

def end_of_turn(tokenizer):
    """The chat format's end-of-turn marker when it is not EOS: '<|im_end|>' for ChatML."""
    return "<|im_end|>" if "<|im_end|>" in (tokenizer.chat_template or "") else None

@torch.no_grad()
def sample(model, tokenizer, prompt_ids, k, args, desc):
    """k responses per prompt: len(prompt_ids) * k token-id lists, grouped by prompt, each cut
    after its first EOS or end-of-turn marker (kept: pi learns to end turns) or max_new_tokens."""
    eos, pad, marker = tokenizer.eos_token_id, tokenizer.pad_token_id, end_of_turn(tokenizer)
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    stops = [eos] + marker_ids[-1:] if len(marker_ids) == 1 else [eos]  # single tokens
    responses, size, prompt_ids = [], args.sample_batch, shard(prompt_ids)  # see shard()
    for i in tqdm(range(0, len(prompt_ids), size), desc=desc, leave=False):
        ids, attn = left_pad(prompt_ids[i:i + size], pad, model.device)
        # top_k=0 and top_p=1 so that the samples come from pi_t itself (at this temperature);
        # a marker of several tokens is caught as a string (stop_strings).
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0,
                             top_p=1.0, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, num_return_sequences=k,
                             pad_token_id=pad, eos_token_id=stops, tokenizer=tokenizer,
                             stop_strings=[marker] if len(marker_ids) > 1 else None)
        for row in out[:, ids.shape[1]:].tolist():
            end = next((j + 1 for j, token in enumerate(row) if token in stops), len(row))
            if len(marker_ids) > 1:  # the shortest prefix whose text holds the marker
                low, high = 0, end
                while low < high:
                    mid = (low + high) // 2
                    found = marker in tokenizer.decode(row[:mid])
                    low, high = (low, mid) if found else (mid + 1, high)
                end = low
            responses.append(row[:end])
    return gather(responses, k)

def decode(tokenizer, responses):
    """The texts annotators see: special tokens and the end-of-turn marker left out."""
    marker = end_of_turn(tokenizer)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return [(t.split(marker)[0] if marker else t).strip() for t in texts]

# --- Annotators (step 2). Every annotator answers, for each pair (a, b), n_annotators values in
# [0, 1]: a vote or a probability that a is better than b. A panel stacks its annotators'
# answers. Part II adds an LLM judge and a reward model; people's votes come in with --pairs.
class Annotator:
    """The protocol. compare() is required; reward() is the true reward of each text where the
    annotator knows it (only the simulated one does), else None."""
    n_annotators = 1  # answers per pair

    def compare(self, prompts, texts_a, texts_b):  # -> (P, n_annotators)
        raise NotImplementedError

    def reward(self, texts):  # -> (P,) or None
        return None

POSITIVE = "great good lovely wonderful fun amazing".split()
NEGATIVE = "bad awful boring terrible dull poor".split()

def hidden_rewards(texts):
    """The simulated annotators' reward: (# positive words) - (# negative words), per text."""
    return torch.tensor([sum((w in POSITIVE) - (w in NEGATIVE) for w in t.split()) for t in texts],
                        dtype=torch.float32)

class SimulatedAnnotators(Annotator):
    """n Bradley-Terry annotators sharing the hidden reward (they like positive words): each
    votes for a with probability sigma(sharpness * (r(a) - r(b))); `gen`: the panel's stream."""

    def __init__(self, n_annotators, sharpness, gen):
        self.n_annotators, self.sharpness, self.gen = n_annotators, sharpness, gen

    def compare(self, prompts, texts_a, texts_b):  # -> (P, n) votes in {0, 1}
        p = torch.sigmoid(self.sharpness * (hidden_rewards(texts_a) - hidden_rewards(texts_b)))
        return torch.bernoulli(p[:, None].expand(-1, self.n_annotators), generator=self.gen)

    def reward(self, texts):
        return hidden_rewards(texts)

class Panel:
    """The annotators together: compare() stacks their answers into (P, N), asking about
    `group` consecutive pairs (a prompt's) at a time in each process (see shard())."""

    def __init__(self, annotators, gen):
        self.annotators, self.gen = annotators, gen

    def compare(self, prompts, texts_a, texts_b, group=1):
        mine = [shard(x, group) for x in (prompts, texts_a, texts_b)]
        answers = [a.compare(*mine) for a in self.annotators] if mine[0] else []
        return torch.tensor(gather(torch.cat(answers, 1).tolist() if answers else [], group))

    def reward(self, texts):
        """The true reward, from the first annotator that knows it; None if none does."""
        return next((r for a in self.annotators if (r := a.reward(texts)) is not None), None)

# --- Steps 1-4 of one iteration: sample, annotate, rank, label.
def annotate(panel, prompts, texts, k, smoothing):
    """Steps 2-4: every pair of each prompt's k responses goes to the panel; Zermelo scores rank
    them; the best-vs-worst pair and its soft label are kept. Returns a list of dicts (one per
    prompt) with best, worst (indices among the k), votes_a, n_annotators, p_hat, target."""
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    flat = [(prompt, texts[q * k + i], texts[q * k + j])
            for q, prompt in enumerate(prompts) for i, j in pairs]
    answers = panel.compare(*map(list, zip(*flat)), group=len(pairs))  # (prompts * pairs, N)
    n = answers.shape[1]
    votes = answers.sum(-1).view(len(prompts), len(pairs))  # for a
    wins = torch.zeros(len(prompts), k, k)
    for m, (i, j) in enumerate(pairs):
        wins[:, i, j], wins[:, j, i] = votes[:, m], n - votes[:, m]
    scores = zermelo_scores(wins)  # (prompts, k)
    best, worst = scores.argmax(-1), scores.argmin(-1)
    rows = torch.arange(len(prompts))
    votes_best = wins[rows, best, worst]
    p_hat = empirical_preference(votes_best, n, smoothing)  # step 4: the soft label
    target = preference_logit(p_hat)
    return [dict(best=int(best[q]), worst=int(worst[q]), votes_a=float(votes_best[q]),
                 n_annotators=n, p_hat=float(p_hat[q]),
                 target_logit=float(target[q]), scores=[round(float(s), 4) for s in scores[q]])
            for q in range(len(prompts))]

def degenerate(text_a, text_b):
    """Nothing can be learned from identical responses, or from empty ones (including responses
    truncated to nothing)."""
    return text_a == text_b or not text_a.strip() or not text_b.strip()

def sampled_pairs(model, tokenizer, panel, chunk, t, args):
    """Steps 1-4: K samples per prompt from pi_t, the panel's votes, Zermelo ranking, best vs
    worst, soft label. Returns the training rows and statistics (timings, skipped pairs)."""
    # 1. Sample K responses per prompt from pi_t.
    torch.manual_seed(phase_seed(args.seed, t, "sample"))
    tic = time.time()
    prompt_ids = [encode_prompt(tokenizer, p, args.max_prompt_tokens) for p in chunk]
    responses = sample(model, tokenizer, prompt_ids, args.num_responses, args,
                       f"iter {t + 1} sample")
    texts = decode(tokenizer, responses)
    seconds_sample = time.time() - tic

    # 2-4. The panel votes on every pair; Zermelo ranking; best vs worst; soft label.
    tic = time.time()
    panel.gen.manual_seed(phase_seed(args.seed, t, "annotate"))
    k = args.num_responses
    rows, skipped = [], 0
    for q, label in enumerate(annotate(panel, chunk, texts, k, args.smoothing)):
        a, b = q * k + label["best"], q * k + label["worst"]
        if degenerate(texts[a], texts[b]):
            skipped += 1  # nothing to learn: equal or empty responses
            continue
        rows.append(dict(prompt=chunk[q], response_a=texts[a], response_b=texts[b], **label,
                         prompt_ids=prompt_ids[q], a_ids=responses[a], b_ids=responses[b]))
    eos, tokens = tokenizer.eos_token_id, sum(map(len, responses))
    ended = sum(len(r) < args.max_new_tokens or r[-1] == eos for r in responses)  # EOS or marker
    return rows, dict(skipped_pairs=skipped, response_tokens_mean=tokens / len(responses),
                      eos_rate=ended / len(responses),
                      seconds_sample=seconds_sample, seconds_annotate=time.time() - tic,
                      sample_tokens_per_s=tokens / seconds_sample)

# --- Steps 5-6: the reference log-probs, then the regression.
def reference_logprobs(model, rows, pad, args):
    """Step 5: log pi_t of both responses of every pair, once, without gradients: the only trace
    of the reference pi_t (no second model in memory), saved with the pairs for anyone to check."""
    prompt_ids = [r["prompt_ids"] for r in rows]
    ref_a, ref_b = (batched_logprobs(model, prompt_ids, [r[side] for r in rows], pad,
                                     args.micro_batch_size) for side in ("a_ids", "b_ids"))
    for row, la, lb in zip(rows, ref_a.tolist(), ref_b.tolist()):
        row.update(logp_ref_a=la, logp_ref_b=lb)
    return ref_a, ref_b

@contextlib.contextmanager
def trainable(model, args):
    """The parameters to train: fresh LoRA adapters (--lora-rank r > 0), merged into the
    weights on exit so that the model stays a plain one, or every weight."""
    if args.lora_rank:
        params = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    else:
        params = list(model.parameters())
        model.requires_grad_(True)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing runs in train mode only; dropout was zeroed at load
    try:
        yield params
    finally:
        model.eval()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        merge_lora(model)
        model.requires_grad_(False)

def fit(params, n, micro_loss, args, lr, epochs, desc):
    """The one training loop (step 6, and the SFT that makes pi_0): Adam, cosine schedule with
    linear warm-up, gradient clipping. Each epoch visits the n items in random order,
    --batch-size per optimizer step, accumulating --micro-batch-size at a time; micro_loss(idx,
    epoch) returns the summed loss of those items. With many processes each takes its share of every
    batch, and their gradients are summed: every process takes the very same step."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.Adam(params, lr=lr)
    for p in params:  # zeros, not None: a process whose share of a batch is empty adds zeros
        p.grad = torch.zeros_like(p)
    steps = math.ceil(n / args.batch_size) * epochs
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)
    with tqdm(total=steps, desc=desc, leave=False) as bar:  # closed on errors too
        for epoch in range(epochs):
            order = torch.randperm(n)
            for start in range(0, n, args.batch_size):
                batch = order[start:start + args.batch_size]
                mine = shard(batch.tolist())
                for m in range(0, len(mine), args.micro_batch_size):
                    loss = micro_loss(mine[m:m + args.micro_batch_size], epoch)
                    (loss / len(batch)).backward()  # the whole batch's mean, once summed
                total(p.grad for p in params)
                norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"the gradient became non-finite in epoch {epoch + 1}")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=False)
                bar.update()
    opt.zero_grad(set_to_none=True)  # frees the gradients' memory

def train(model, rows, ref_a, ref_b, pad, args):
    """Step 6: minimize the chosen loss over the pairs, pi_t's log-probs (ref_a, ref_b) fixed;
    the model becomes pi_{t+1}. Returns the last epoch's diagnostics, and tokens seen."""
    loss_fn, target = LOSSES[args.loss], torch.tensor([r["target_logit"] for r in rows])
    h_all, loss_all = torch.zeros(len(rows)), torch.zeros(len(rows))

    def micro_loss(idx, epoch):
        # Both responses of every pair in one forward pass: rows [a_1..a_B, b_1..b_B].
        prompt_ids = [rows[i]["prompt_ids"] for i in idx] * 2
        response_ids = [rows[i]["a_ids"] for i in idx] + [rows[i]["b_ids"] for i in idx]
        batch = collate(prompt_ids, response_ids, pad, model.device)
        logps_a, logps_b = sequence_logprobs(model, *batch).cpu().split(len(idx))
        logratio_a, logratio_b = logps_a - ref_a[idx], logps_b - ref_b[idx]
        losses = loss_fn(logratio_a, logratio_b, target[idx], args.beta)  # (micro,)
        if epoch == args.epochs - 1:  # the last epoch's diagnostics
            h_all[idx] = args.beta * (logratio_a - logratio_b).detach()
            loss_all[idx] = losses.detach()
        return losses.sum()
    with trainable(model, args) as params:
        fit(params, len(rows), micro_loss, args, args.lr, args.epochs, "train")
    total([h_all, loss_all])  # each process filled in its share of the pairs
    tokens = args.epochs * sum(2 * len(r["prompt_ids"]) + len(r["a_ids"]) + len(r["b_ids"])
                               for r in rows)
    return dict(loss=float(loss_all.mean()),
                regression_mse=float(((h_all - target) ** 2).mean()),
                sign_agreement=float((torch.sign(h_all) == torch.sign(target)).float().mean()),
                reward_margin=float(h_all.mean())), tokens

def sft(model, tokenizer, examples, args, lr, epochs):
    """The supervised warm-up that makes pi_0 from (prompt_ids, response_ids) examples: the mean
    NLL of each example's response tokens, by the method's own helpers (LoRA merged after)."""
    def micro_loss(idx, epoch):
        batch = collate(*zip(*[examples[i] for i in idx]), tokenizer.pad_token_id, model.device)
        return -(sequence_logprobs(model, *batch) / batch[2].sum(-1)).sum()
    with trainable(model, args) as params:
        fit(params, len(examples), micro_loss, args, lr, epochs, "SFT")

# --- Step 7: evaluate pi_{t+1} against pi_0 on held-out prompts.
def evaluate(model, tokenizer, panel, ev, t, args):
    """Win-rate against pi_0 and true reward of pi_{t+1}'s held-out samples; KL to pi_t and pi_0.
    `ev` holds the held-out prompts and pi_0's and pi_t's samples (then pi_{t+1}'s), log-probs."""
    torch.manual_seed(phase_seed(args.seed, t, "eval"))
    panel.gen.manual_seed(phase_seed(args.seed, t, "eval"))
    current = sample(model, tokenizer, ev.ids, 1, args, f"iter {t + 1} eval")
    ev.texts = decode(tokenizer, current)
    win_rate = panel.compare(ev.prompts, ev.texts, ev.initial_texts).mean()
    true_reward = panel.reward(ev.texts)
    # KL(pi_t || pi_{t+1}) and KL(pi_0 || pi_{t+1}) as sample means of log p - log q over
    # the held-out samples drawn from pi_t and pi_0 (unbiased; may come out < 0 by chance).
    logps = lambda responses: batched_logprobs(model, ev.ids, responses, tokenizer.pad_token_id,
                                               args.sample_batch)
    kl_ref = (ev.previous_logps - logps(ev.previous)).mean()
    kl_init = (ev.initial_logps - logps(ev.initial)).mean()
    ev.previous, ev.previous_logps = current, logps(current)
    return dict(win_rate_vs_initial=float(win_rate),
                true_reward=None if true_reward is None else float(true_reward.mean()),
                kl_to_reference=float(kl_ref), kl_to_initial=float(kl_init))

# --- The loop.
def run(args):
    """Steps 1-7 for t = 0..T-1. Returns the list of metrics dicts, one per iteration."""
    r = start_run(args)  # input checked, pi_t loaded (t = 0, or where --resume continues)
    for t in range(r.start, args.iterations):
        # 1-4. Sample K responses per prompt from pi_t; the panel votes on every pair; Zermelo
        #      ranking; best vs worst; the panel's soft label (or take the given pairs).
        if r.given:
            rows, stats = given_pairs(r.tokenizer, r.given[t], args.max_prompt_tokens)
        else:
            rows, stats = sampled_pairs(r.model, r.tokenizer, r.panel, r.chunks[t], t, args)
        target = check_targets(rows, t)

        # 5. log pi_t of both responses, once, without gradients.
        tic = time.time()
        ref_a, ref_b = reference_logprobs(r.model, rows, r.pad, args)

        # 6. Minimize the loss over the pairs: the model becomes pi_{t+1}.
        peak_memory_mb(r.device, reset=True)
        torch.manual_seed(phase_seed(args.seed, t, "train"))
        try:
            fitted, tokens = train(r.model, rows, ref_a, ref_b, r.pad, args)
        except FloatingPointError as e:
            fail(f"iteration {t + 1}: {e}; try a lower --lr ({t} complete iterations are kept "
                 f"in {args.out}/)")
        seconds_train = time.time() - tic

        # 7. Evaluate pi_{t+1}: win-rate against pi_0 and true reward on held-out prompts; KL.
        tic = time.time()
        scores = evaluate(r.model, r.tokenizer, r.panel, r.ev, t, args)
        metrics = dict(
            iteration=t + 1, loss_type=args.loss, **fitted, **scores,
            target_logit_mean=float(target.mean()), pairs=len(rows), **stats,
            seconds_train=seconds_train, seconds_eval=time.time() - tic,
            train_tokens_per_s=tokens / seconds_train, peak_memory_mb=peak_memory_mb(r.device))
        finish_iteration(r, t, rows, metrics)
    if r.start < args.iterations:
        show_samples(r, args)
    return r.history

def check_targets(rows, t):
    """The pairs' target logits, after checking that there is something finite to learn."""
    if not rows:
        fail(f"iteration {t + 1}: every pair was degenerate (identical or empty responses); "
             "try a higher --temperature or more --num-responses")
    return torch.tensor([r["target_logit"] for r in rows])

# =============================================================================================
# PART II. THE MACHINERY. Nothing below changes the method: the command line, files, model
# loading, LoRA, the other annotators, the tiny world, many processes, runs that stop, main.
# =============================================================================================

# --- The command line: the settings of Part I as flags, checked as they are read.
def fail(message):
    """Stop: one line on stderr, exit status 2, no traceback; under torchrun, from process 0."""
    if RANK:  # every process meets the same bad input; torchrun stops this one when 0 has exited
        time.sleep(10)
    print(f"irepo.py: error: {message}", file=sys.stderr)
    sys.exit(2)

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt}

def checked(flag, kind, rule):
    """A type= for argparse: the value, or one line and exit 2 unless it satisfies `rule`."""
    def parse(text):
        if text == "auto" and rule.endswith("auto"):
            return text
        value = kind(text)  # a ValueError here is argparse's own "invalid float value"
        bounds = [(op, float(x)) for op, x in re.findall(r"([<>]=?) (\d+)", rule)]
        if not (math.isfinite(value) and all(OPS[op](value, x) for op, x in bounds)):
            fail(f"{flag} {value}: must be {rule}")
        return value
    parse.__name__ = kind.__name__
    return parse

def preset_for(model):
    """Mistral-7B's preset for its names (base and Instruct), tiny's for 'tiny', else Phi-2's."""
    name = model.rstrip("/").lower()
    return ("tiny" if name == "tiny" else
            "mistral-7b" if name.startswith("mistralai/mistral-7b") else "phi-2")

def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(
        description="iREPO: iterative alignment by regression on empirical preferences.")
    p.error = fail  # one line and exit status 2, instead of usage + message
    a = p.add_argument
    a("--model", default="tiny", help="'tiny' (built in, offline) or a Hugging Face name or folder")
    a("--preset", choices=sorted(PRESETS), help="settings to start from (default: by --model)")
    a("--out", default="out", help="output folder: iterations, pairs, metrics")
    a("--prompts", help="FILE: .txt, a prompt a line, or .jsonl with a 'prompt' string a line")
    a("--pairs", help="FILE: labelled pairs (pairs.jsonl format) instead of steps 1-4")
    a("--sft", help="FILE: chat 'messages' JSONL to fine-tune --model on first (pi_0)")
    one = p.add_mutually_exclusive_group().add_argument  # --resume or --overwrite, not both
    one("--resume", action="store_true", help="continue the run in --out after its last iteration")
    one("--overwrite", action="store_true", help="replace the run in --out (keeps warm-up and SFT)")
    a("--seed", type=int, default=0, help="seeds every random stream")
    a("--theory", action="store_true", help="print numerical checks of the paper's theory, exit")
    a("--compare", action="store_true", help="reward-KL frontier of irepo, dpo and ipo")
    for name, (kind, rule, default, meaning) in SETTINGS.items():  # None: the preset's value
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            a(flag, action=argparse.BooleanOptionalAction, help=meaning)
        elif isinstance(rule, tuple):
            a(flag, choices=rule, help=meaning)
        else:
            a(flag, type=checked(flag, kind, rule) if rule else kind, help=meaning)
    args = p.parse_args(argv)

    args.preset = args.preset or preset_for(args.model)
    tiny = {key: spec[2] for key, spec in SETTINGS.items()}  # the preset fills what flags left
    for key, value in (tiny | PRESETS[args.preset]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model != "tiny":
        check_model(f"--model {args.model}", args.model)
    args.annotator_specs = parse_annotators(args.annotators, args.num_annotators)
    args.micro_batch_size = min(args.micro_batch_size, args.batch_size)
    args.warmup = os.path.join(args.out, "warmup")  # where the tiny model's warm-up is cached
    return args

def is_path(name):
    """A model name that can only be a local folder (a hub id is 'name' or 'org/name')."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1

def check_model(label, name):
    """Before any work: a model given as a path must exist."""
    if is_path(name) and not os.path.isdir(os.path.expanduser(name)):
        fail(f"{label}: no such folder")

def load_error(label, name, error, hint):
    """One line for a model that cannot be loaded, saying why by what its name looks like."""
    why = ("not a model folder" if is_path(name) or os.path.isdir(name)
           else "cannot be downloaded: no network, or no such model")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    fail(f"{label}: cannot be loaded ({why}; {first_line}); {hint}")

DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the weights' dtype on each device

def kv_cache_bytes(config, tokens, dtype_bytes=2):
    """The KV cache of one sequence of `tokens` tokens: K and V in every layer, in bytes."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes * tokens

def sample_batch(model, args, device):
    """--sample-batch-size, 'auto' resolved: on CUDA the most prompts whose KV cache (K sequences,
    prompt + new tokens) fits in half the memory left after the weights; elsewhere 16."""
    if args.sample_batch_size != "auto" or device.type != "cuda":
        return 16 if args.sample_batch_size == "auto" else args.sample_batch_size
    per_prompt = args.num_responses * kv_cache_bytes(
        model.config, args.max_prompt_tokens + args.max_new_tokens, model.dtype.itemsize)
    free = torch.cuda.mem_get_info(device)[0]
    size = max(1, int(free / 2 // per_prompt))  # the other half: annotators, logits
    print(f"sample batch: {size} prompts per generate() call ({per_prompt / 2**30:.2f} GiB of KV "
          f"cache each, {free / 2**30:.0f} GiB free after the weights)")
    return size

def peak_memory_mb(device, reset=False):
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**20

# --- Prompts and given pairs: the built-in list or files, checked line by line before any work.
def read_lines(path, flag):
    """The lines of a UTF-8 text file, or one clear error naming the flag and the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        fail(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8")
    except OSError as e:
        fail(f"{flag} {path}: cannot be read ({e.strerror})")

def read_jsonl(path, flag):
    """(where, object) for every non-empty line of a JSONL file; `where` is 'file:line'."""
    for number, line in enumerate(read_lines(path, flag), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
        if not isinstance(row, dict):
            fail(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{number}", row

def read_prompts(path):
    """Prompts: the non-empty lines of a .txt file, or the 'prompt' string of each .jsonl line."""
    is_text = lambda p: isinstance(p, str) and p.strip()
    prompts = ([check(row, where, "prompt", is_text, "a non-empty string").strip()
                for where, row in read_jsonl(path, "--prompts")] if path.endswith(".jsonl")
               else [line.strip() for line in read_lines(path, "--prompts") if line.strip()])
    if not prompts:
        fail(f"--prompts {path}: the file holds no prompt")
    return prompts

def replies(messages):
    """The indices of the assistant turns that answer a user turn."""
    return [i for i, m in enumerate(messages)
            if m["role"] == "assistant" and i and messages[i - 1]["role"] == "user"]

def read_conversations(path):
    """--sft: a chat 'messages' list per line, with an assistant turn after a user turn."""
    conversations = []
    for where, row in read_jsonl(path, "--sft"):
        messages = row.get("messages")
        if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(
                m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
            fail(f"{where}: field 'messages' must be a list of {{'role', 'content'}} strings")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
        if not replies(conversations[-1]):
            fail(f"{where}: field 'messages' has no assistant turn after a user turn")
    if not conversations:
        fail(f"--sft {path}: the file holds no conversation")
    return conversations

def sft_examples(tokenizer, conversations, args):
    """(prompt_ids, response_ids) for every reply: the conversation before it in the chat
    template, and the reply followed by the end-of-turn marker (EOS if the format has none),
    so that pi_0 learns to end its turns; cut at --max-new-tokens."""
    marker, ids = end_of_turn(tokenizer), lambda text: tokenizer(text, add_special_tokens=False)
    end = ids(marker)["input_ids"] if marker else [tokenizer.eos_token_id]
    return [(encode_prompt(tokenizer, messages[:i], args.max_prompt_tokens),
             (ids(messages[i]["content"])["input_ids"] + end)[:args.max_new_tokens])
            for messages in conversations for i in replies(messages)]

def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def check(row, where, field, ok, what):
    """row[field] if ok(row[field]); else one line naming the line, the field and the value."""
    if not ok(row.get(field)):
        fail(f"{where}: field '{field}' must be {what}, got {row.get(field)!r}")
    return row.get(field)

def pair_target(row, where, smoothing):
    """logit p_hat of a given pair: from the votes ('votes_a' of 'n_annotators', smoothed as
    sampled pairs are), else from a probability 'p_hat' (not smoothed)."""
    if "votes_a" not in row:
        p = check(row, where, "p_hat", lambda p: is_number(p) and 0 < p < 1,
                  "a number strictly between 0 and 1 (or give 'votes_a' and 'n_annotators')")
        return math.log(p) - math.log1p(-p)
    n = check(row, where, "n_annotators", lambda n: is_number(n) and n >= 1, "a number >= 1")
    v = check(row, where, "votes_a", lambda v: is_number(v) and 0 <= v <= n,
              "a number in [0, n_annotators]")
    return float(preference_logit(empirical_preference(torch.tensor(float(v)), n, smoothing)))

def read_pairs(path, smoothing):
    """(file:line, pair) for each line, in iteration_t/pairs.jsonl's format: 'prompt', 'response_a',
    'response_b', a label (see pair_target), and token ids if any (a saved pair is then exact)."""
    rows = []
    for where, row in read_jsonl(path, "--pairs"):
        check(row, where, "prompt", lambda p: isinstance(p, str) and p.strip(),
              "a non-empty string")
        for field in ("response_a", "response_b"):
            check(row, where, field, lambda y: isinstance(y, str), "a string")
        for field in ("prompt_ids", "a_ids", "b_ids"):
            check(row, where, field, lambda ids: ids is None or isinstance(ids, list) and all(
                isinstance(i, int) and i >= 0 for i in ids), "a list of token ids")
        rows.append((where, dict(row, target_logit=pair_target(row, where, smoothing))))
    if not rows:
        fail(f"--pairs {path}: the file holds no pair")
    return rows

def split_prompts(prompts, args):
    """Held-out prompts first, then T disjoint chunks, after a seeded shuffle."""
    if args.eval_prompts >= len(prompts):
        fail(f"--eval-prompts {args.eval_prompts}: only {len(prompts)} prompts exist, and some "
             "must be left for training; lower it or give more prompts")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    prompts = [prompts[int(i)] for i in order]
    held_out, rest = prompts[:args.eval_prompts], prompts[args.eval_prompts:]
    if len(rest) < args.iterations:
        fail(f"--iterations {args.iterations}: only {len(rest)} prompts are left after "
             f"--eval-prompts {args.eval_prompts}; give more prompts or fewer iterations")
    size = min(args.prompts_per_iteration or len(rest), len(rest) // args.iterations)
    return held_out, [rest[t * size:(t + 1) * size] for t in range(args.iterations)]

def split_pairs(rows, iterations):
    """Given pairs, in file order, cut into T consecutive chunks, one per iteration."""
    if len(rows) < iterations:
        fail(f"--pairs: {len(rows)} pairs cannot feed {iterations} iterations; lower --iterations")
    size = len(rows) // iterations
    return [rows[t * size:(t + 1) * size] for t in range(iterations)]

def given_pairs(tokenizer, chunk, max_tokens):
    """Steps 1-4 replaced by --pairs: tokenize the given pairs (unless they carry token ids)."""
    eos, rows = tokenizer.eos_token_id, []
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    for where, row in chunk:
        if degenerate(row["response_a"], row["response_b"]):
            continue
        rows.append(dict(row, prompt_ids=row.get("prompt_ids") or encode_prompt(
            tokenizer, row["prompt"], max_tokens), a_ids=row.get("a_ids") or ids(row["response_a"]),
            b_ids=row.get("b_ids") or ids(row["response_b"])))
        if max(rows[-1]["prompt_ids"] + rows[-1]["a_ids"] + rows[-1]["b_ids"]) >= len(tokenizer):
            fail(f"{where}: token ids exceed the vocabulary of --model {tokenizer.name_or_path}")
    lengths = [len(r[f"{s}_ids"]) for r in rows for s in "ab"] or [0]
    return rows, dict(skipped_pairs=len(chunk) - len(rows),
                      response_tokens_mean=sum(lengths) / len(lengths), eos_rate=None,
                      seconds_sample=0.0, seconds_annotate=0.0, sample_tokens_per_s=None)

# --- Model loading.
# Prompt formats for tokenizers that bring no chat template of their own.
CHAT_TEMPLATES = {
    "tiny": "{% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<reply>{% endif %}",
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
               "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
               "{% endfor %}",
}

def load_policy(args, device, folder):
    """A causal LM and its tokenizer from `folder`; the tiny warm-up is built once, then reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    if folder == args.warmup and not on_main(os.path.isdir, folder):
        build_tiny(folder, seed=0)  # once: published whole, so never reused half-written
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE[device.type],
                                                     attn_implementation="sdpa").to(device)
    except (OSError, ValueError, ImportError) as e:
        load_error(f"--model {args.model}", folder, e, "use --model tiny or a local folder")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # responses end at EOS
    if not tokenizer.chat_template:
        if folder == args.model and not args.sft:
            print(f"warning: {args.model} has no chat template of its own, so it is a base model; "
                  "the paper starts from an SFT model: add --sft FILE (see the README) or give "
                  "an SFT checkpoint to --model")
        tokenizer.chat_template = CHAT_TEMPLATES[args.chat_format]  # saved with every iteration
    # Zero every dropout, so that train mode (which gradient checkpointing needs) computes the
    # same function as evaluation: pi_theta == pi_t at the first step.
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    # A checkpoint's own generation settings (top-k, repetition penalty, ...) would reshape the
    # samples; a neutral config leaves only --temperature, so the samples come from pi_t.
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    if args.lora_rank and not lora_layers(model, args.lora_targets):
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if is_linear(m)})
        fail(f"--lora-targets {args.lora_targets}: no linear layer of {args.model} has that "
             f"name; its linear layers are {','.join(linear)}")
    return model, tokenizer

# --- LoRA, in the file: adapters on the chosen linear layers, merged back after every iteration so
# that each saved iteration is a plain model and pi_t is exactly the next reference.
def is_linear(module):
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's

class LoRALinear(torch.nn.Module):
    """y = base(x) + (alpha / r) B A x. B starts at zero, so the model starts exactly at pi_t;
    A and B are fp32 whatever the base's dtype, so that small updates are not lost to bf16."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.transposed = not isinstance(base, torch.nn.Linear)  # Conv1D stores W as (in, out)
        d_out, d_in = base.weight.shape[::-1] if self.transposed else base.weight.shape
        self.A = torch.nn.Parameter(torch.empty(rank, d_in, device=base.weight.device))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (self.scale * (x.float() @ self.A.T @ self.B.T)).to(x.dtype)

def lora_layers(model, targets):
    names = {t.strip() for t in targets.split(",") if t.strip()}
    return [n for n, m in model.named_modules() if n.split(".")[-1] in names and is_linear(m)]

def swap(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

def add_lora(model, rank, alpha, targets):
    """Freeze the model, wrap the target layers in LoRALinear; returns the adapter parameters."""
    model.requires_grad_(False)
    for name in lora_layers(model, targets):
        swap(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.A, m.B)]

@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its weight, W += (alpha / r) B A (in fp32), and unwrap it."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            delta = m.scale * (m.B @ m.A)  # (out, in)
            m.base.weight += (delta.T if m.transposed else delta).to(m.base.weight.dtype)
            swap(model, name, m.base)

# --- The other annotators. --annotators is a comma-separated list of:
#   sim[:N]      N simulated Bradley-Terry annotators (default N: --num-annotators)
#   judge:MODEL  a causal LM asked which response is better, in both orders
#   rm:MODEL     a scalar reward model (sequence classifier): p = sigma(r_a - r_b)
def parse_annotators(spec, n_sim):
    """'sim:4,rm:NAME' -> [('sim', 4), ('rm', 'NAME')]; stops with a clear line if malformed."""
    kinds = []
    for item in (x.strip() for x in spec.split(",")):
        kind, _, arg = item.partition(":")
        if kind == "sim" and (not arg or (arg.isdigit() and int(arg) >= 1)):
            kinds.append(("sim", int(arg) if arg else n_sim))
        elif kind in ("judge", "rm") and arg:
            check_model(f"--annotators {kind}:{arg}", arg)
            kinds.append((kind, arg))
        elif kind == "human":
            fail(f"--annotators {spec}: people are not asked at the terminal; collect their votes "
                 "and give the pairs with --pairs (votes_a, n_annotators per pair)")
        else:
            fail(f"--annotators {spec}: cannot read '{item}'; use sim[:N], judge:MODEL or "
                 "rm:MODEL, separated by commas")
    return kinds

JUDGE_QUESTION = ("Which response follows the instruction better?\n\nInstruction:\n{prompt}\n\n"
                  "Response A:\n{a}\n\nResponse B:\n{b}\n\nAnswer with a single letter, A or B.")

class ModelAnnotator(Annotator):
    def __init__(self, model, tokenizer, batch_size, max_tokens):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens

class JudgeAnnotator(ModelAnnotator):
    """A causal LM as a judge: P(a is better) from its next-token logits for the labels A and B,
    asked with a first and with b first, averaged, so that an LLM judge's position bias cancels."""

    def __init__(self, model, tokenizer, *sizes):
        super().__init__(model, tokenizer, *sizes)
        self.labels = [tokenizer(x, add_special_tokens=False)["input_ids"][-1] for x in "AB"]
        if self.labels[0] == self.labels[1]:
            raise ValueError("its tokenizer cannot tell the labels 'A' and 'B' apart")

    @torch.no_grad()
    def compare(self, prompts, texts_a, texts_b):
        (label_a, label_b), tok, size = self.labels, self.tokenizer, self.batch_size
        ids = [encode_prompt(tok, JUDGE_QUESTION.format(prompt=q, a=x, b=y), self.max_tokens)
               for q, x, y in zip(prompts * 2, texts_a + texts_b, texts_b + texts_a)]  # both orders
        p = []
        for i in range(0, len(ids), size):
            batch = left_pad(ids[i:i + size], tok.pad_token_id, self.model.device)
            logits = last_logits(self.model, *batch, keep=1)[:, -1].float()
            p += torch.sigmoid(logits[:, label_a] - logits[:, label_b]).tolist()
        n = len(prompts)
        return ((torch.tensor(p[:n]) + 1 - torch.tensor(p[n:])) / 2)[:, None]

class RewardModelAnnotator(ModelAnnotator):
    """A scalar reward model scores each distinct response once; p(a > b) = sigma(r_a - r_b)."""

    @torch.no_grad()
    def scores(self, prompts, texts):
        out = []
        for i in range(0, len(texts), self.batch_size):
            q, y = prompts[i:i + self.batch_size], texts[i:i + self.batch_size]
            if self.tokenizer.chat_template:  # a chat RM scores the conversation
                q = [self.tokenizer.apply_chat_template([{"role": "user", "content": a},
                                                         {"role": "assistant", "content": b}],
                                                        tokenize=False) for a, b in zip(q, y)]
                y = None
            enc = self.tokenizer(q, y, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt").to(self.model.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)

    def compare(self, prompts, texts_a, texts_b):
        keys = sorted(set(zip(prompts, texts_a)) | set(zip(prompts, texts_b)))
        score = dict(zip(keys, self.scores([k[0] for k in keys], [k[1] for k in keys]).tolist()))
        r_a, r_b = (torch.tensor([score[k] for k in zip(prompts, t)]) for t in (texts_a, texts_b))
        return torch.sigmoid(r_a - r_b)[:, None]

def build_panel(args, device):
    """Load every annotator of --annotators; one that cannot be loaded stops the run."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    gen = torch.Generator().manual_seed(args.seed)  # the simulated votes' stream
    annotators = []
    for kind, arg in args.annotator_specs:
        if kind == "sim":
            annotators.append(SimulatedAnnotators(arg, args.sharpness, gen))
            continue
        try:
            tok = AutoTokenizer.from_pretrained(arg)
            tok.pad_token = tok.pad_token or tok.eos_token
            if kind == "judge" and not tok.chat_template:
                tok.chat_template = CHAT_TEMPLATES[args.chat_format]
            auto = AutoModelForCausalLM if kind == "judge" else AutoModelForSequenceClassification
            model = auto.from_pretrained(arg, dtype=DTYPE[device.type]).to(device).eval()
            model.config.pad_token_id = tok.pad_token_id
            cls = JudgeAnnotator if kind == "judge" else RewardModelAnnotator
            annotators.append(cls(model, tok, args.sample_batch, args.max_prompt_tokens * 4))
        except (OSError, ValueError, ImportError) as e:
            load_error(f"--annotators {kind}:{arg}", arg, e, "use a local folder or sim")
    return Panel(annotators, gen)

# --- The tiny world: a toy language of reviews, its prompts, and the annotators' hidden reward.
# The simulated annotators like positive words (POSITIVE and NEGATIVE, in Part I). A warm-up on
# random reviews (a stand-in for the SFT model the paper starts from) gives pi_0 with about as
# many negative words as positive ones.
TOPICS = ("food movie hotel book game park song class trip room "
          "city show beach team car phone cafe museum concert garden").split()
QUALIFIERS = ["", "old ", "new ", "big ", "small ", "local ", "first ", "last "]
VERBS = ["describe", "review", "tell me about", "write about"]
ASPECTS = "staff price view music story ending service crowd weather start".split()
NEUTRAL = "fine okay long quiet busy usual".split()
SPECIALS = ["<pad>", "<eos>", "<unk>", "<reply>"]

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
    """The tiny pi_0: a word-level 2-layer GPT-2 fine-tuned on random reviews (our SFT). ~20 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted(set(" ".join(tiny_prompts() + TOPICS + ASPECTS + POSITIVE + NEGATIVE + NEUTRAL
                                + ["the was and . A B"]).split()))  # A, B: a judge's labels
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=["<reply>"])
    tokenizer.chat_template = CHAT_TEMPLATES["tiny"]  # "review the hotel <reply>"
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"],
                        pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    prompts = [tiny_prompts()[int(i)] for i in torch.randint(640, (steps * 64,), generator=gen)]
    ids = {p: encode_prompt(tokenizer, p) for p in set(prompts)}
    examples = [(ids[p], tokenizer(tiny_review(p, gen), add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id]) for p in prompts]
    settings = SimpleNamespace(batch_size=64, micro_batch_size=64, warmup_ratio=0.1,
                               max_grad_norm=1.0, lora_rank=0, gradient_checkpointing=False)
    sft(model, tokenizer, examples, settings, lr=3e-3, epochs=1)  # the same SFT as --sft
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    on_main(publish, folder, model, tokenizer, {})

# --- Many processes: `torchrun --nproc_per_node N irepo.py ...` runs the method on N processes, one
# GPU each. Each process samples, annotates and scores its share of the prompts, and trains on
# its share of every batch; gather() gives every process all the pairs, and summed gradients give
# all the same weights. Process 0 alone prints and writes files. Without torchrun these are no-ops.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's

def start_processes():
    """Join the processes torchrun started: NCCL between GPUs, gloo for CPU tensors (or alone)."""
    global tqdm
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if RANK:  # the others print nothing; their errors still reach stderr
        sys.stdout, tqdm = open(os.devnull, "w"), functools.partial(tqdm, disable=True)

def shard(items, k=1):
    """This process's share of items, taken k at a time (a prompt's k responses stay together)."""
    return [x for i, x in enumerate(items) if i // k % WORLD == RANK]

def gather(items, k=1):
    """shard() undone: every process's share, in the original order, in every process."""
    parts = [items] * WORLD
    if len(parts) > 1:
        dist.all_gather_object(parts, items)
    groups = [[part[i:i + k] for i in range(0, len(part), k)] for part in parts]
    return [x for j in range(len(groups[0])) for g in groups if j < len(g) for x in g[j]]

def total(tensors):
    """Sum each tensor over the processes, in place: gradients, per-pair diagnostics. One
    all-reduce for them all (a call per tensor costs more than the sums on CPUs)."""
    tensors = list(tensors)
    if WORLD > 1:
        flat = torch.cat([x.flatten() for x in tensors])
        dist.all_reduce(flat)
        for x, y in zip(tensors, flat.split([x.numel() for x in tensors])):
            x.copy_(y.view_as(x))

def on_main(fn, *args):
    """fn(*args) in process 0 alone (files are written once); the others wait for its result."""
    result = [fn(*args) if RANK == 0 else None]
    if WORLD > 1:
        dist.broadcast_object_list(result)
    return result[0]

# --- Runs that stop. Every iteration's folder is written under a temporary name and renamed when
# complete, so a run killed at any point keeps its complete iterations; --resume continues
# after the last one with the same random streams (each phase is seeded by its iteration).
NOT_RUN_SETTINGS = {"out", "resume", "overwrite", "warmup", "theory", "compare",
                    "annotator_specs", "sample_batch"}
RUN_FILES = {"config.json", "metrics.jsonl", "initial_eval.json"}
PHASES = {"sample": 1, "annotate": 2, "train": 3, "eval": 4}

def phase_seed(seed, iteration, phase):
    """A seed per phase, iteration and process: a resumed run draws what an uninterrupted one
    would. Training's is the same in every process, so that all shuffle the pairs alike."""
    rank = 0 if phase == "train" else RANK
    return (seed * 1_000_003 + iteration * 101 + PHASES[phase] + 7919 * rank) % 2**31

def write_atomic(path, text):
    """Write a file under a temporary name, then rename it: readers see all of it or none."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def complete_iterations(out):
    """k such that iteration_1 .. iteration_k are all complete (renamed into place)."""
    k = 0
    while os.path.isfile(os.path.join(out, f"iteration_{k + 1}", "metrics.json")):
        k += 1
    return k

def run_settings(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RUN_SETTINGS}

def check_out(args):
    """Check --out (writable, not another run's); returns the iterations --resume skips."""
    try:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, ".write-test"), "")
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as e:
        fail(f"--out {args.out}: cannot be written ({e.strerror}); choose another folder")
    settings, config_path = run_settings(args), os.path.join(args.out, "config.json")
    ours = [e for e in os.listdir(args.out) if e in RUN_FILES or e.startswith("iteration_")]
    if ours and not (args.resume or args.overwrite):
        fail(f"--out {args.out} already holds a run ({complete_iterations(args.out)} complete "
             "iterations); add --resume to continue it or --overwrite to start again")
    if ours and args.resume:
        saved = read_json(config_path) if os.path.isfile(config_path) else {}
        diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (now {settings.get(k)})"
                 for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if diffs:
            fail(f"--resume: {args.out} was written with other settings: {', '.join(diffs)}; "
                 "rerun with the same flags, or use --overwrite")
    return complete_iterations(args.out) if args.resume else 0

def claim_out(args):
    """Clear what --overwrite replaces and a killed run left half-written; save the settings."""
    for entry in os.listdir(args.out):
        ours = entry in RUN_FILES or entry.startswith("iteration_")
        if (args.overwrite and ours) or entry.endswith(".tmp"):
            path = os.path.join(args.out, entry)  # a .tmp is an iteration cut short
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write_atomic(os.path.join(args.out, "config.json"),
                 json.dumps(run_settings(args), indent=1) + "\n")

def load_eval(path):
    saved = read_json(path)  # initial_eval.json or eval.json: held-out responses, log-probs
    return saved["responses"], torch.tensor(saved["logps"])

def jsonl_line(row):
    return json.dumps(row) + "\n"

def read_json(path):
    with open(path) as f:
        return json.load(f)

def publish(folder, model, tokenizer, files):
    """Save a model, its tokenizer and `files` ({name: text}) under folder.tmp, then rename it:
    a folder that exists is complete."""
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    model.save_pretrained(folder + ".tmp")
    tokenizer.save_pretrained(folder + ".tmp")
    for name, text in files.items():
        write_atomic(os.path.join(folder + ".tmp", name), text)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(folder + ".tmp", folder)

def save_iteration(out, t, model, tokenizer, rows, ev, metrics):
    """iteration_t/ (model, tokenizer, pairs, samples, metrics) and metrics.jsonl; a write
    error removes the half-written folder and leaves the complete iterations intact."""
    final = os.path.join(out, f"iteration_{t}")
    try:
        held_out = {"responses": ev.previous, "logps": ev.previous_logps.tolist()}
        publish(final, model, tokenizer, {"pairs.jsonl": "".join(map(jsonl_line, rows)),
                                          "metrics.json": jsonl_line(metrics),
                                          "eval.json": json.dumps(held_out)})
        write_atomic(f"{out}/metrics.jsonl", "".join(map(jsonl_line, read_metrics(out))))
    except OSError as e:
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        fail(f"writing {final} failed ({e.strerror or e}); the {t - 1} complete iterations "
             f"before it are intact; {'free some space' if full else 'fix that'}, then rerun "
             "with --resume")

def read_metrics(out):
    """The metrics rows of every complete iteration in `out`, in order."""
    return [read_json(os.path.join(out, f"iteration_{k}", "metrics.json"))
            for k in range(1, complete_iterations(out) + 1)]

def start_run(args):
    """Every input checked before anything expensive, then pi_t (pi_0, or the last complete
    iteration on --resume), the panel and pi_0's held-out samples; `start` is the first t."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # see DTYPE
    prompts = read_prompts(args.prompts) if args.prompts else tiny_prompts()
    held_out, chunks = split_prompts(prompts, args)
    given = (split_pairs(read_pairs(args.pairs, args.smoothing), args.iterations)
             if args.pairs else None)
    conversations = read_conversations(args.sft) if args.sft else None
    start = on_main(check_out, args)
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())
                                if k not in ("annotator_specs", "warmup")))
    print(f"device: {device}" + (f" in {WORLD} processes" if WORLD > 1 else "")
          + f", {len(held_out)} held-out prompts, {len(chunks)} chunks of "
          + (f"{len(given[0])} given pairs" if given else f"{len(chunks[0])} prompts")
          + (f"; resuming after iteration {start}" if start else ""))
    r = SimpleNamespace(start=start, out=args.out, history=read_metrics(args.out)[:start], ev=None)
    if start == args.iterations:
        print(f"all {start} iterations are complete in {args.out}/")
        return r

    base = args.warmup if args.model == "tiny" else args.model
    if start:
        model, tokenizer = load_policy(args, device, os.path.join(args.out, f"iteration_{start}"))
    else:
        model, tokenizer = (build_sft(args, device, base, conversations) if conversations
                            else load_policy(args, device, base))
    args.sample_batch = sample_batch(model, args, device)
    panel = build_panel(args, device)
    on_main(claim_out, args)

    # pi_0 on the held-out prompts: eval_samples responses per prompt, kept for every later
    # comparison (and saved, so that a resumed run compares against the very same samples).
    repeated = [p for p in held_out for _ in range(args.eval_samples)]
    ev = SimpleNamespace(prompts=repeated, ids=[
        encode_prompt(tokenizer, p, args.max_prompt_tokens) for p in repeated])
    initial_path = os.path.join(args.out, "initial_eval.json")
    if start:
        ev.initial, ev.initial_logps = load_eval(initial_path)
        ev.previous, ev.previous_logps = load_eval(f"{args.out}/iteration_{start}/eval.json")
    else:
        torch.manual_seed(phase_seed(args.seed, 0, "eval"))
        ev.initial = sample(model, tokenizer, ev.ids, 1, args, "sample pi_0")
        ev.initial_logps = batched_logprobs(model, ev.ids, ev.initial, tokenizer.pad_token_id,
                                            args.sample_batch)
        on_main(write_atomic, initial_path,
                json.dumps({"responses": ev.initial, "logps": ev.initial_logps.tolist()}))
        ev.previous, ev.previous_logps = ev.initial, ev.initial_logps  # pi_t's, log pi_t
    ev.initial_texts = decode(tokenizer, ev.initial)
    reward = panel.reward(ev.initial_texts)
    if reward is not None:
        print(f"pi_0: true reward {reward.mean():.3f} on held-out prompts")
    r.__dict__.update(device=device, model=model, tokenizer=tokenizer, pad=tokenizer.pad_token_id,
                      panel=panel, chunks=chunks, given=given, ev=ev)
    return r

SFT_SETTINGS = ("model", "sft", "sft_lr", "sft_epochs", "seed", "lora_rank", "lora_alpha",
                "lora_targets", "batch_size", "micro_batch_size", "warmup_ratio", "max_grad_norm",
                "max_prompt_tokens", "max_new_tokens", "chat_format")

def build_sft(args, device, base, conversations):
    """pi_0 as the paper makes it: --model fine-tuned on --sft, saved as sft/ in --out and
    reused while every setting the SFT reads stays the same (--overwrite keeps it)."""
    folder, recipe = os.path.join(args.out, "sft"), {k: getattr(args, k) for k in SFT_SETTINGS}
    made = os.path.join(folder, "sft.json")
    if on_main(lambda: os.path.isfile(made) and read_json(made) == recipe):
        return load_policy(args, device, folder)
    model, tokenizer = load_policy(args, device, base)
    torch.manual_seed(args.seed)
    sft(model, tokenizer, sft_examples(tokenizer, conversations, args), args, args.sft_lr,
        args.sft_epochs)
    on_main(publish, folder, model, tokenizer, {"sft.json": json.dumps(recipe)})
    return model, tokenizer  # trained in memory: the saved copy need not be loaded again

def finish_iteration(r, t, rows, m):
    """Save iteration t + 1 (atomically), record its metrics m and print its one line."""
    on_main(save_iteration, r.out, t + 1, r.model, r.tokenizer, rows, r.ev, m)
    r.history.append(m)
    print(f"iter {t + 1} | loss {m['loss']:.4f} | mse {m['regression_mse']:.4f} "
          f"| sign {m['sign_agreement']:.2f} | win {m['win_rate_vs_initial']:.3f} "
          + (f"| reward {m['true_reward']:+.3f} " if m["true_reward"] is not None else "")
          + f"| kl_ref {m['kl_to_reference']:.3f} | len {m['response_tokens_mean']:.1f} "
          f"| sample {m['seconds_sample']:.1f}s annotate {m['seconds_annotate']:.1f}s "
          f"train {m['seconds_train']:.1f}s ({m['train_tokens_per_s']:.0f} tok/s)")

def show_samples(r, args):
    """Three held-out prompts with the responses of pi_0 and of the last policy."""
    shown = list(zip(r.ev.prompts, r.ev.initial_texts, r.ev.texts))[::args.eval_samples][:3]
    for prompt, before, after in shown:
        print(f"  {prompt!r}\n    pi_0: {before}\n    pi_{args.iterations}: {after}")

def main(argv=None):
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        start_processes()
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
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # handled like Ctrl-C
    try:
        history = run(args)
    except KeyboardInterrupt:
        argv = [a for a in (sys.argv[1:] if argv is None else argv)
                if a not in ("--overwrite", "--resume")]
        launch = f"torchrun --nproc_per_node {WORLD}" if WORLD > 1 else "python"
        if RANK == 0:
            print(f"\nirepo.py: interrupted; {complete_iterations(args.out)} complete iterations "
                  f"are kept in {args.out}/. Resume with: {launch} irepo.py "
                  f"{shlex.join(argv + ['--resume'])}", file=sys.stderr)
        sys.exit(130)
    last = history[-1]
    rewards = " -> ".join(f"{m['true_reward']:+.2f}" for m in history
                          if m["true_reward"] is not None)
    print(f"done in {time.time() - tic:.0f}s: win-rate vs pi_0 {last['win_rate_vs_initial']:.3f}"
          + (f", true reward {rewards}" if rewards else "") + f"; outputs in {args.out}/")

# =============================================================================================
# PART III. THE THEORY, CHECKED NUMERICALLY, AND THE LOSSES COMPARED.
# =============================================================================================

# --- The theory, checked numerically (python irepo.py --theory). A tabular world where everything
# is exact: X prompts, Y responses each, a reference pi_ref, true rewards r, Bradley-Terry
# preferences P(i > j) = sigma(r_i - r_j), and a policy that is a table of logits. It runs
# through the same irepo_loss, empirical_preference, preference_logit and zermelo_scores.
def tabular_world(seed, prompts=4, responses=6):
    """log pi_ref (X, Y) and true rewards r (X, Y), float64, drawn from a seeded normal."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(prompts, responses, generator=g, dtype=torch.float64)
    return torch.log_softmax(draw(), -1), draw()

def optimal_policy(log_ref, r, beta):
    """log pi* = log pi_ref + r/beta - log Z: the maximizer of E_pi[r] - beta KL(pi || pi_ref)."""
    return torch.log_softmax(log_ref + r / beta, -1)

def kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)

def pair_weights(scheme, log_pi, r, k=4):
    """P(pair i < j) per prompt, (X, pairs): 'uniform'; 'on-policy', i and j drawn from pi;
    'best-worst', the best and worst of k draws from pi, ranked by Zermelo scores of the exact
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
    cdf = F.pad(torch.zeros_like(pi).scatter(1, rank, pi).cumsum(-1), (1, 0))  # in rank order
    mass = lambda lo, hi: (cdf.gather(1, hi + 1) - cdf.gather(1, lo)).clamp(min=0) ** k
    lo, hi = torch.minimum(rank[:, I], rank[:, J]), torch.maximum(rank[:, I], rank[:, J])
    # P(min rank = lo and max rank = hi) over k draws from pi, by inclusion-exclusion.
    return mass(lo, hi) - mass(lo + 1, hi) - mass(lo, hi - 1) + mass(lo + 1, hi - 1)

def fit_tabular(log_ref, targets, beta, weights_fn=None, rounds=3):
    """Minimize sum_pairs w * irepo_loss over a table of logits from pi_ref (L-BFGS, float64);
    targets (X, pairs); weights_fn(log_pi), the pair weights, is re-evaluated each round."""
    Y = log_ref.shape[-1]
    I, J = torch.triu_indices(Y, Y, 1)
    theta = log_ref.clone().requires_grad_(True)
    for _ in range(rounds):
        w = weights_fn(torch.log_softmax(theta, -1).detach()) if weights_fn else 1.0
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-16, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logratio = torch.log_softmax(theta, -1) - log_ref  # (X, Y)
            losses = w * irepo_loss(logratio[:, I], logratio[:, J], targets, beta)
            loss = losses.sum() / (w.sum() if weights_fn else losses.numel())
            loss.backward()
            return loss
        opt.step(closure)
    return torch.log_softmax(theta, -1).detach()

def exact_targets(r):
    I, J = torch.triu_indices(r.shape[-1], r.shape[-1], 1)
    return preference_logit(torch.sigmoid(r[:, I] - r[:, J]))

def theory_optimality(betas=(0.1, 0.5, 1.0), schemes=("uniform", "on-policy", "best-worst")):
    """Claim 1: with exact preferences the minimizer is pi*. Returns {(beta, scheme): error}."""
    log_ref, r = tabular_world(0)
    out = {}
    for beta in betas:
        for scheme in schemes:
            weights = lambda log_pi: pair_weights(scheme, log_pi, r)
            log_pi = fit_tabular(log_ref, exact_targets(r), beta, weights)
            out[beta, scheme] = float((log_pi - optimal_policy(log_ref, r, beta)).abs().max())
    return out

def theory_annotators(ns=(1, 4, 16, 64, 256), seeds=20, beta=1.0, smoothing=0.5):
    """Claim 2: with N annotators per pair (votes ~ Binomial(N, P)), J(pi*) - J(pi_N) =
    beta KL(pi_N || pi*) falls as N grows. Returns {N: (mean, stderr)}, a world per seed."""
    gaps = {n: [] for n in ns}
    for seed in range(seeds):
        log_ref, r = tabular_world(1000 + seed)
        p = torch.sigmoid(exact_targets(r))
        g = torch.Generator().manual_seed(seed)
        star = optimal_policy(log_ref, r, beta)
        for n in ns:
            votes = torch.binomial(torch.full_like(p, float(n)), p, generator=g)
            targets = preference_logit(empirical_preference(votes, n, smoothing))
            log_pi = fit_tabular(log_ref, targets, beta, rounds=1)
            gaps[n].append(float((beta * kl(log_pi, star)).mean()))
    return {n: (float(torch.tensor(g).mean()), float(torch.tensor(g).std()) / seeds ** 0.5)
            for n, g in gaps.items()}

def theory_iterations(ts=(1, 2, 3), beta=1.0):
    """Claim 3: T exact iterations with reference pi_t reach pi_0 exp(T r / beta) / Z.
    Returns {T: max |log pi_T - log pi*_{beta/T}|}."""
    log_ref, r = tabular_world(0)
    out, log_pi = {}, log_ref
    for t in range(1, max(ts) + 1):
        log_pi = fit_tabular(log_pi, exact_targets(r), beta)  # pi_t is the next reference
        if t in ts:
            out[t] = float((log_pi - optimal_policy(log_ref, r, beta / t)).abs().max())
    return out

def theory_hard_labels(steps=4000, every=1000, beta=0.1, lr=1.0, prompts=8):
    """Claim 4: each prompt has 4 responses and one pair (0, 1) with a single Bradley-Terry vote;
    gradient descent on DPO and on iREPO (target logit 0.75 for the winner) from pi_ref. Returns
    rows (step, DPO gap, iREPO gap, DPO's mean pi(y_l)); gap: log-ratio of winner - loser."""
    log_ref, r = tabular_world(0, prompts=prompts, responses=4)
    g = torch.Generator().manual_seed(0)
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
    tic, schemes = time.time(), ("uniform", "on-policy", "best-worst")
    print("Claim 1. Exact preferences: the minimizer of the iREPO loss is pi* = pi_ref exp(r/beta)"
          "/Z\n  max |log pi - log pi*| over 4 prompts x 6 responses\n  {:>6} {:>12} {:>12} {:>12}"
          .format("beta", *schemes))
    opt = theory_optimality(schemes=schemes)
    for beta in sorted({b for b, _ in opt}):
        print(f"  {beta:>6} " + " ".join(f"{opt[beta, s]:>12.1e}" for s in schemes))
    print("\nClaim 2. N annotators per pair: suboptimality J(pi*) - J(pi_N) = beta KL(pi_N || pi*)"
          f"\n  beta = 1, uniform pairs, smoothing 0.5, mean over 20 worlds\n  {'N':>5} "
          f"{'beta*KL':>10} {'+-stderr':>10}")
    ann = theory_annotators()
    for n, (gap, se) in ann.items():
        print(f"  {n:>5} {gap:>10.5f} {se:>10.5f}")
    x = torch.tensor([math.log(n) for n in ann], dtype=torch.float64)
    y = torch.tensor([math.log(g) for g, _ in ann.values()], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    tail = float((y[-1] - y[-3]) / (x[-1] - x[-3]))
    print(f"  log-log slope: {slope:.2f} over all N, {tail:.2f} over N >= 16 (variance alone: -1)")
    print("\nClaim 3. T iterations with reference pi_t reach pi_0 exp(T r / beta) / Z (beta = 1)"
          f"\n  {'T':>3} {'max |log pi_T - log pi*_(beta/T)|':>36}")
    for t, err in theory_iterations().items():
        print(f"  {t:>3} {err:>36.1e}")
    print("\nClaim 4. One vote per pair: log-ratio gap (winner - loser) under gradient descent, "
          f"beta = 0.1\n  {'step':>6} {'DPO gap':>10} {'iREPO gap':>10} {'DPO pi(y_l)':>12}")
    for step, dpo, ire, loser in theory_hard_labels():
        print(f"  {step:>6} {dpo:>10.3f} {ire:>10.3f} {loser:>12.2e}")
    print(f"\n(theory checks took {time.time() - tic:.1f}s)")

# --- The losses compared (python irepo.py --compare): the reward-KL frontier of the DPO paper's
# controlled sentiment experiment, on the tiny world. Each loss runs over a grid of beta (chosen so
# that the KL ranges overlap) and several seeds; every iteration of every run is a point (KL to
# pi_0, true reward); a loss is better where its frontier lies above the others at equal KL.
COMPARE_BETAS = {"irepo": (0.5, 1.0, 2.0), "dpo": (1.0, 2.0, 4.0), "ipo": (0.1, 0.25, 0.5)}

def interpolate(points, x):
    """y at x, linearly interpolated along points (x, y) taken in order of x; None outside."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)

def matched_rewards(rows, levels):
    """{loss: {level: [reward per seed]}}. A seed's frontier is the upper envelope of its points
    over every beta (a point counts if no point with less KL has more reward), interpolated
    along; past its last point it stays flat (a run can stop early), before its first, None."""
    out = {}
    for loss, seed in sorted({(r["loss"], r["seed"]) for r in rows}):
        frontier = []
        for x, y in sorted((r["kl_to_initial"], r["true_reward"]) for r in rows
                           if (r["loss"], r["seed"]) == (loss, seed)):
            if not frontier or y > frontier[-1][1]:
                frontier.append((x, y))
        for level in levels:
            y = frontier[-1][1] if level >= frontier[-1][0] else interpolate(frontier, level)
            if y is not None:
                out.setdefault(loss, {}).setdefault(level, []).append(y)
    return out

def verdict(table, level):
    """'a > b' for each pair of losses where every seed of a beats every seed of b at this level
    (with 3 seeds each, a 1/20 chance if a and b were the same loss); else 'within noise'."""
    have = {loss: v[level] for loss, v in table.items() if len(v.get(level, [])) >= 2}
    wins = [f"{a} > {b}" for a in have for b in have if a != b and min(have[a]) > max(have[b])]
    return ", ".join(wins) or "within noise"

def compare_losses(args, grid=COMPARE_BETAS, seeds=3):
    """Every loss over its beta grid and `seeds` seeds, from one shared warm-up; frontier.jsonl; the
    true reward at KL levels inside every loss's and seed's range (nothing is extrapolated)."""
    rows = []
    for loss, betas in grid.items():
        for beta in betas:
            for s in range(args.seed, args.seed + seeds):
                out = os.path.join(args.out, "compare", f"{loss}_beta{beta}_seed{s}")
                sub = SimpleNamespace(**dict(vars(args), loss=loss, beta=beta, seed=s, out=out,
                                             overwrite=True, resume=False))
                print(f"\n=== --loss {loss} --beta {beta} --seed {s} ===")
                keys = ("iteration", "kl_to_initial", "true_reward", "win_rate_vs_initial")
                rows += [dict(loss=loss, beta=beta, seed=s, **{k: m[k] for k in keys})
                         for m in run(sub)]
    on_main(write_atomic, os.path.join(args.out, "frontier.jsonl"), "".join(map(jsonl_line, rows)))
    runs = {(r["loss"], r["seed"]) for r in rows}
    low, high = (f(g(r["kl_to_initial"] for r in rows if (r["loss"], r["seed"]) == run)
                   for run in runs) for f, g in ((max, min), (min, max)))
    levels = [low + (high - low) * i / 4 for i in range(5)] if high > low else []
    table = matched_rewards(rows, levels)
    print(f"\nTrue reward at matched KL(pi_0 || pi_t), mean +- std over {seeds} seeds "
          f"(frontier.jsonl in {args.out}/ has every point):")
    print(f"{'KL':>6} " + "".join(f"{loss:>16}" for loss in grid) + "   verdict")
    for level in levels:
        ys = [torch.tensor(table.get(loss, {}).get(level, [float("nan")])) for loss in grid]
        cells = [f"{y.mean():.2f}" + (f" +- {y.std():.2f}" if len(y) > 1 else "") for y in ys]
        print(f"{level:>6.2f} " + "".join(f"{c:>16}" for c in cells), "  ", verdict(table, level))
    return rows

if __name__ == "__main__":
    main()
    if dist.is_initialized():  # leave together and at once: tearing gloo down can abort the exit
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
