"""
iREPO: implicit Reward pairwise difference based Empirical Preference Optimization.
A single-file reference implementation of arXiv 2405.15230 (Le, Shu, Nguyen, Hong, Tran, 2024),
https://arxiv.org/abs/2405.15230

The method, one iteration t at a time (pi_t is the current policy and also the reference):
  1. sample K responses per prompt from pi_t;
  2. a panel of N annotators votes on every pair of them;
  3. Zermelo (Bradley-Terry maximum-likelihood) scores s fitted to all the votes rank them: keep
     the best and the worst;
  4. the soft label p_hat(best > worst) = sigma(s_best - s_worst), from that same fit;
  5. log pi_t of both responses is computed once, without gradients;
  6. minimize (h - logit p_hat)^2, h = beta*[log pi/pi_t (best) - log pi/pi_t (worst)] the
     implicit reward pairwise difference;
  7. evaluate pi_{t+1} against the initial policy pi_0 on held-out prompts.

Part I is the method (settings, building blocks, steps 1-7, the loop); Part II is the machinery,
which changes nothing in the method; Part III checks the theory and compares the losses.

Run it:
  python irepo.py                      # built-in tiny model and simulated panel, CPU, ~30 s
  python irepo.py --loss dpo           # the same with DPO on the label's winner (or ipo)
  python irepo.py --theory             # check the paper's theory numerically, in seconds
  python irepo.py --compare            # 4 losses, 2 labels: reward-KL frontier, ~2.6 min
  python irepo.py --model microsoft/phi-2 --sft ultrachat_sft.jsonl   # GPU, UltraFeedback
  torchrun --nproc_per_node 8 irepo.py --model mistralai/Mistral-7B-v0.1 \
      --sft ultrachat_sft.jsonl        # 8 GPUs
  python -m pytest -q test_irepo.py    # the tests

Deliberate deviations from the paper, numbered as in the README's list, which says why:
  1. the loss is reconstructed (abstract, reviews, artifacts); log-probs summed over tokens;
  2. the label is the Zermelo fit's s_best - s_worst, which reuses the votes that chose the pair;
  3. `smoothing` pseudo-votes keep a unanimous panel's logit finite;
  4. annotators: simulated (tiny world) or one public reward model (presets);
  5. log-probs scored at temperature 1; sampling without top-k or top-p; dropout zeroed;
  6. DPO and IPO train on the label's sign; IPO is the squared loss with target 1/2 on the h scale;
  7. the optimizer clips the gradient norm at 1;
  8. LoRA r = alpha = 128 with the authors' sibling runs' targets; adapters never merged in a run;
  9. prompts: all of UltraFeedback's instructions; K = 4, lengths and temperature are our choice;
 10. SFT: the loss on assistant turns only, with the preset's LoRA and the iterations' optimizer;
 11. evaluation: win-rate against pi_0 and KL on held-out prompts, not the paper's benchmarks;
 12. the tiny world: beta = 1, learning rate 3e-4, 4 epochs, every weight trained.
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
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

# =============================================================================================
# PART I. THE METHOD: settings, building blocks, steps 1-7 of one iteration, the loop.
# =============================================================================================

# --- Settings. Each hyperparameter is declared once, here: name (the flag is --name, with dashes),
# type, valid range, its value in the built-in tiny world, and its meaning. The Phi-2 and
# Mistral-7B presets (the paper's settings where its artifacts show them, our choices elsewhere:
# README) override those values; any flag overrides a preset.
SETTINGS = dict(  # name: (type, valid values, value in the tiny world, meaning)
    # the method
    loss=(str, ("irepo", "dpo", "ipo", "soft-dpo"), "irepo", "iREPO, or DPO, IPO, soft-label DPO"),
    iterations=(int, ">= 1", 3, "T, the number of iterations (fresh prompts each)"),
    num_responses=(int, ">= 2 (a pair needs two responses)", 4, "K, responses per prompt"),
    num_annotators=(int, ">= 1", 8, "N, simulated annotators in 'sim'; one vote each per pair"),
    annotators=(str, None, "sim", "the panel, e.g. 'sim:8,judge:MODEL', 'rm:MODEL'"),
    beta=(float, "> 0", 1.0, "beta, the KL strength in r = beta*log(pi/pi_ref)"),
    smoothing=(float, ">= 1e-6 (0: a unanimous panel's logit is infinite)", 0.5, "pseudo-votes"),
    label=(str, ("zermelo", "votes", "fresh"), "zermelo", "p_hat: the fit, pair's or fresh votes"),
    sharpness=(float, ">= 0", 1.0, "the simulated votes' sigma(sharpness*(r_a - r_b))"),
    # optimization
    lr=(float, "> 0", 3e-4, "Adam learning rate (cosine schedule with warm-up)"),
    warmup_ratio=(float, ">= 0 and < 1", 0.1, "share of the steps that warm the lr up"),
    batch_size=(int, ">= 1", 16, "pairs per optimizer step"),
    micro_batch_size=(int, ">= 1", 16, "pairs per forward pass (gradient accumulation)"),
    epochs=(int, ">= 1", 4, "passes over each iteration's pairs"),
    max_grad_norm=(float, "> 0", 1.0, "gradient clipping"),
    lora_rank=(int, ">= 0 (0: full fine-tuning)", 0, "LoRA rank; 0 trains every weight"),
    lora_alpha=(float, "> 0", None, "LoRA alpha (unset: the rank); updates scale by alpha/rank"),
    lora_targets=(str, None, "c_attn,c_proj,c_fc", "names of the linear layers to adapt"),
    gradient_checkpointing=(bool, None, False, "recompute activations to save memory"),
    # sampling and evaluation
    max_new_tokens=(int, ">= 1", 20, "longest response, in tokens"),
    max_prompt_tokens=(int, ">= 1", 64, "longer prompts keep their last tokens"),
    temperature=(float, "> 0", 1.0, "sampling temperature (scoring always uses 1)"),
    chat_format=(str, ("chatml", "mistral", "tiny"), "tiny", "if the tokenizer has no template"),
    prompts_per_iteration=(int, ">= 1", 192, "prompts per chunk (None: all, split in T)"),
    eval_prompts=(int, ">= 1", 64, "held-out prompts for the win-rate against pi_0"),
    eval_samples=(int, ">= 1", 4, "responses per held-out prompt, for less noisy estimates"),
    sample_batch_size=(int, ">= 1, or auto", 128, "prompts per generate() call; auto: by memory"),
    sft_epochs=(int, ">= 1", 1, "passes of --sft over its conversations"),
    sft_lr=(float, "> 0", 2e-4, "learning rate of --sft"),
)
LLM = dict(  # what the paper's Phi-2 and Mistral-7B settings share; the README explains each
    beta=0.01, lr=5e-6, epochs=1, lora_rank=128, gradient_checkpointing=True,
    max_new_tokens=256, max_prompt_tokens=512, temperature=0.7, prompts_per_iteration=None,
    eval_samples=1, sample_batch_size="auto",
    annotators="rm:OpenAssistant/reward-model-deberta-v3-large-v2")
PRESETS = {
    "tiny": {},  # the built-in default: a word-level GPT-2 trained for seconds on a toy corpus
    "phi-2": dict(LLM, batch_size=16, micro_batch_size=4, chat_format="chatml",
                  lora_targets="q_proj,k_proj,v_proj,dense"),
    "mistral-7b": dict(LLM, batch_size=8, micro_batch_size=2, chat_format="mistral",
                       lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
}

# --- Soft labels and ranking (used by steps 3-4).
def vote_share_logit(votes_a, n_annotators, smoothing):
    """logit p_hat(a > b) for the pair's smoothed vote share p_hat = (v + smoothing) / (N + 2 *
    smoothing): v of the N votes for a, plus `smoothing` pseudo-votes a side, so that the logit
    is finite at 0 and N votes. Taken as log(v + smoothing) - log(N - v + smoothing), never
    through p_hat, which rounds to exactly 1 for a small smoothing and a large N."""
    return torch.log(votes_a + smoothing) - torch.log(n_annotators - votes_a + smoothing)

def preference_logit(p):
    """logit p = log p - log(1 - p): the reward difference that Bradley-Terry assigns to p."""
    return torch.log(p) - torch.log1p(-p)

def zermelo_scores(wins, smoothing):
    """Bradley-Terry (Zermelo) maximum-likelihood log-strengths s from win counts: Newton's method
    in float64 on the log-likelihood sum_ij votes_ij log sigma(s_i - s_j), to convergence.

    Args:
        wins: (..., K, K); wins[..., i, j] = votes for i over j (may be fractional).
        smoothing: pseudo-votes added to every ordered pair, so an undefeated response gets a
            finite score (the likelihood alone would send it to infinity).
    Returns: (..., K) float64 log-strengths, centred to mean 0."""
    K = wins.shape[-1]
    others = 1.0 - torch.eye(K, dtype=torch.float64)
    votes = (wins.double() + smoothing) * others  # (..., K, K)
    games = votes + votes.transpose(-1, -2)  # comparisons between i and j
    # Newton's step times 1, 1/2, ..., 2^-39, or 0: the longest that shrinks the gradient
    sizes = torch.cat([0.5 ** torch.arange(40.0), torch.zeros(1)]).double()[:, None]

    def gradient(scores, votes, games):  # of the log-likelihood, (..., K), summing to 0
        p = torch.sigmoid(scores[..., :, None] - scores[..., None, :])  # P(i beats j)
        return (votes - games * p).sum(-1), p
    # start from the least-squares fit of s_i - s_j to log(votes_ij / votes_ji): close already
    scores = ((votes.log() - votes.transpose(-1, -2).log()).nan_to_num() * others).mean(-1)
    for _ in range(100):  # at most 22 steps seen: K <= 64, N <= 1e5, smoothing >= 1e-6
        slope, p = gradient(scores, votes, games)
        weights = games * p * (1 - p)  # minus the Hessian is the Laplacian of these weights
        laplacian = torch.diag_embed(weights.sum(-1)) - weights
        # + 1/K everywhere makes it invertible and keeps the step's mean at 0, as the scores'
        step = torch.linalg.solve(laplacian + 1.0 / K, slope)
        tries = scores.unsqueeze(-2) + sizes * step.unsqueeze(-2)  # (..., 41, K)
        tried, _ = gradient(tries, votes.unsqueeze(-3), games.unsqueeze(-3))
        shrinks = (tried ** 2).sum(-1) < (slope ** 2).sum(-1).unsqueeze(-1)  # (..., 41)
        shrinks[..., -1] = True  # a short enough step always shrinks it, until rounding rules
        longest = shrinks.int().argmax(-1)  # the first True
        rounding = slope.abs().amax(-1) <= 1e-13 * games.sum((-1, -2))  # float64 can tell no more
        if ((longest == len(sizes) - 1) | (step.abs().amax(-1) < 1e-10) | rounding).all():
            return scores  # converged, or as close as float64 can tell
        scores = tries.gather(-2, longest[..., None, None].expand(*longest.shape, 1, K))[..., 0, :]
    raise ArithmeticError("the Zermelo fit did not converge in 100 Newton steps")

# --- Losses (step 6): pure functions, per pair, one signature. a is the best response and b the
# worst; logratio = log pi_theta(y|x) - log pi_t(y|x), summed over response tokens, and
# h = beta * (logratio_a - logratio_b) is the implicit reward pairwise difference.
def irepo_loss(logratio_a, logratio_b, target_logit, beta):
    """iREPO: the squared error (beta * [logratio_a - logratio_b] - logit p_hat(a > b))^2, (P,)
    losses of logratio_a (best), logratio_b (worst) and target_logit = logit p_hat, each (P,).
    Its minimizer, with exact preferences, is pi_ref * exp(r / beta) / Z (see --theory)."""
    return (beta * (logratio_a - logratio_b) - target_logit) ** 2

def dpo_loss(logratio_a, logratio_b, target_logit, beta):
    """DPO on the label's sign: the winner is a (the best) if logit p_hat >= 0, else b (always a
    with the Zermelo label). Returns: (P,) losses  -log sigma(beta * [logratio_w - logratio_l])."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return -F.logsigmoid(sign * beta * (logratio_a - logratio_b))

def ipo_loss(logratio_a, logratio_b, target_logit, beta):
    """IPO on the label's sign, as DPO: (h_w - 1/2)^2, h_w the winner's h, i.e. IPO's own
    (logratio_w - logratio_l - 1/(2 beta))^2 times beta^2, so that one learning rate serves all
    the losses. Returns: (P,)."""
    sign = torch.where(target_logit >= 0, 1.0, -1.0)
    return (sign * beta * (logratio_a - logratio_b) - 0.5) ** 2

def soft_dpo_loss(logratio_a, logratio_b, target_logit, beta):
    """DPO's cross-entropy with the soft label p_hat = sigma(target_logit) as its target:
    -p_hat log sigma(h) - (1 - p_hat) log sigma(-h). Each pair's loss is least at h = logit p_hat,
    as iREPO's; so with consistent (exact Bradley-Terry) targets both fits reach the same policy,
    while with noisy finite-N labels, which no policy fits exactly, they weigh the misfits apart
    (its gradient sigma(h) - p_hat saturates where iREPO's 2 (h - logit p_hat) grows)."""
    h = beta * (logratio_a - logratio_b)
    p_hat = torch.sigmoid(target_logit)
    return -p_hat * F.logsigmoid(h) - (1 - p_hat) * F.logsigmoid(-h)

LOSSES = {"irepo": irepo_loss, "dpo": dpo_loss, "ipo": ipo_loss, "soft-dpo": soft_dpo_loss}

# --- Log-probabilities (used by steps 5-7). The one place that owns padding, positions, shifting,
# masking and the fp32 upcast.
def collate(prompt_ids, response_ids, pad_id, device):
    """Lay out rows as [pad.. prompt | response ..pad]: prompts left-padded (as generate() sees
    them), responses right-padded, the width trimmed to this batch's longest prompt and response.
    Returns input_ids, attention_mask, response_mask, each (B, prompt_width + response_width)."""
    prompt_width = max(len(prompt) for prompt in prompt_ids)
    response_width = max(1, max(len(response) for response in response_ids))
    shape = (len(prompt_ids), prompt_width + response_width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        start, end = prompt_width - len(prompt), prompt_width + len(response)
        input_ids[i, start:end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, start:end] = 1
        response_mask[i, prompt_width:end] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)

def left_pad(prompt_ids, pad_id, device):
    """Prompts alone, left-padded to a common length: input_ids and attention_mask (B, P)."""
    input_ids, attention_mask, _ = collate(prompt_ids, [[]] * len(prompt_ids), pad_id, device)
    return input_ids[:, :-1], attention_mask[:, :-1]  # collate leaves one response slot

def last_logits(model, input_ids, attention_mask, keep):
    """The logits of the last `keep` positions, (B, keep, V), of left-padded rows. Positions
    count real tokens only, so a padded row is scored as it would be alone (up to rounding); without
    this, HF models number the pads and shift every position."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=keep, use_cache=False).logits

def sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """log pi(y|x) summed over the response tokens, one value per row.

    Args:
        input_ids, attention_mask, response_mask: (B, W); response_mask is 1 on response tokens.
    Returns:
        (B,) float32 sums of log pi(token | everything before it) over the response tokens.
    """
    # The logit at position i predicts token i+1. Responses sit at the right, so only the last
    # `keep` positions need the LM head: this skips the (B, W, V) logits of the prompts.
    width = input_ids.shape[1]
    if response_mask.any():
        first = int(response_mask.any(0).float().argmax())  # the first response column
    else:
        first = width - 1
    first = max(first, 1)  # token 0 has nothing before it to predict it
    keep = width - first + 1
    logits = last_logits(model, input_ids, attention_mask, keep)[:, :-1]  # (B, W - first, V)
    targets = input_ids[:, first:]  # (B, W - first)
    mask = response_mask[:, first:].bool()
    # log softmax of the chosen token = its logit - logsumexp(all logits), in fp32. Gathering
    # first avoids a full (B, W, V) fp32 log-softmax; the upcast is one row at a time.
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, W - first)
    logsumexp = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    token_logps = torch.where(mask, chosen - logsumexp, 0.0)  # where, not *: pad logits may be nan
    return token_logps.sum(-1)

@torch.no_grad()  # frozen: the reference pi_t and every evaluation
def batched_logprobs(model, prompt_ids, response_ids, pad_id, batch_size):
    """sequence_logprobs of many (prompt, response) rows, batch_size at a time: (rows,)."""
    my_prompts, my_responses = shard(prompt_ids), shard(response_ids)  # this process's share
    logps = []
    for start in range(0, len(my_prompts), batch_size):
        end = start + batch_size
        batch = collate(my_prompts[start:end], my_responses[start:end], pad_id, model.device)
        logps += sequence_logprobs(model, *batch).tolist()
    return torch.tensor(gather(logps))  # every process's share, in order, in every process

# --- Sampling (used by steps 1 and 7): K responses per prompt from a policy, batched. The
# prompts come in the chat template (encode_prompt), the texts out without it (decode).
@torch.no_grad()
def sample(model, tokenizer, prompt_ids, k, temperature, max_new_tokens, batch_size, desc):
    """k responses per prompt: len(prompt_ids) * k token-id lists, grouped by prompt, each cut
    after its first EOS or end-of-turn marker (kept: pi learns to end turns) or max_new_tokens."""
    marker = end_of_turn(tokenizer)
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    stops = [tokenizer.eos_token_id]  # token ids that end a response
    if len(marker_ids) == 1:
        stops.append(marker_ids[0])
    long_marker = marker if len(marker_ids) > 1 else None  # caught as a string, then cut
    my_prompts, responses = shard(prompt_ids), []  # this process's share of the prompts
    for start in tqdm(range(0, len(my_prompts), batch_size), desc=desc, leave=False):
        input_ids, attention_mask = left_pad(my_prompts[start:start + batch_size],
                                             tokenizer.pad_token_id, model.device)
        # top_k=0 and top_p=1 so that the samples come from pi_t itself (at this temperature).
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                             top_k=0, top_p=1.0, temperature=temperature,
                             max_new_tokens=max_new_tokens, num_return_sequences=k,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
                             tokenizer=tokenizer,
                             stop_strings=[long_marker] if long_marker else None)
        for row in out[:, input_ids.shape[1]:].tolist():
            row = row[:end_of_response(row, stops)]
            if long_marker:
                row = row[:cut_at_marker(tokenizer, row, long_marker)]
            responses.append(row)
    return gather(responses, k)  # every process's share, a prompt's k together, in order

# --- Annotators (used by steps 2 and 7). Each annotator answers, for each pair (a, b), values in
# [0, 1]: votes or probabilities that a is better than b. Part II has them: simulated
# Bradley-Terry voters, an LLM judge, a reward model; people's votes come in with --pairs.
@dataclass
class Panel:
    """The annotators together: compare() stacks their answers into (P, N)."""
    annotators: list
    gen: torch.Generator  # the simulated votes' random stream

    def compare(self, prompts, texts_a, texts_b, group=1):
        """Each process asks about its share of the pairs, `group` consecutive pairs (a prompt's)
        at a time; every process gets all the answers, in order."""
        my_prompts = shard(prompts, group)  # this process's share of the pairs
        my_texts_a, my_texts_b = shard(texts_a, group), shard(texts_b, group)
        my_answers = []
        if my_prompts:
            answers = [annotator.compare(my_prompts, my_texts_a, my_texts_b)
                       for annotator in self.annotators]
            my_answers = torch.cat(answers, 1).tolist()
        return torch.tensor(gather(my_answers, group))

    def reward(self, texts):
        """The true reward, from the first annotator that knows it; None if none does."""
        for annotator in self.annotators:
            rewards = annotator.reward(texts)
            if rewards is not None:
                return rewards
        return None

# --- Steps 1-4 of one iteration: sample, annotate, rank, label.
def rank_responses(wins, smoothing):
    """Step 3: Zermelo scores (..., K) from the votes on every pair, with `smoothing` pseudo-votes
    per ordered pair, and the best and the worst response. When all K scores tie, argmax and
    argmin would name one response twice: the worst is the lowest of the others."""
    scores = zermelo_scores(wins, smoothing)
    best = scores.argmax(-1)
    worst = scores.scatter(-1, best[..., None], float("inf")).argmin(-1)
    return scores, best, worst

def annotate(panel, prompts, texts, k, smoothing, label):
    """Steps 2-4: every pair of each prompt's k responses (texts, grouped by prompt) goes to the
    panel; Zermelo scores rank them; the best-vs-worst pair and its soft label are kept. Returns
    one dict per prompt; best and worst are indices among the k, votes_a the pair's own votes,
    wins[i][j] the votes for response i over j, scores the fit's s."""
    first, second = torch.triu_indices(k, k, 1).tolist()  # the pairs i < j, (0, 1) first
    # every pair of every prompt, a prompt's pairs together
    pair_prompts = [prompt for prompt in prompts for _ in first]
    pair_texts_a = [texts[number * k + i] for number in range(len(prompts)) for i in first]
    pair_texts_b = [texts[number * k + j] for number in range(len(prompts)) for j in second]
    answers = panel.compare(pair_prompts, pair_texts_a, pair_texts_b, group=len(first))
    n_annotators = answers.shape[1]  # answers: (prompts * pairs, N)
    votes = answers.sum(-1).view(len(prompts), len(first))  # for the first of each pair
    wins = torch.zeros(len(prompts), k, k)  # wins[:, i, j]: votes for i over j
    wins[:, first, second] = votes
    wins[:, second, first] = n_annotators - votes
    scores, best, worst = rank_responses(wins, smoothing)  # step 3: scores (prompts, k)
    rows = torch.arange(len(prompts))
    votes_best = wins[rows, best, worst]
    if label == "zermelo":  # step 4: with w = exp(s), w_best / (w_best + w_worst), whose logit is
        target_logit = scores[rows, best] - scores[rows, worst]  # s_best - s_worst
    else:  # the pair's own votes (with --label fresh, a stand-in until fresh_votes)
        target_logit = vote_share_logit(votes_best.double(), n_annotators, smoothing)
    p_hat = torch.sigmoid(target_logit)  # for display and the files; training reads the logit
    return [dict(best=int(best[q]), worst=int(worst[q]), votes_a=float(votes_best[q]),
                 n_annotators=n_annotators, p_hat=float(p_hat[q]),
                 target_logit=float(target_logit[q]), label=label, wins=wins[q].tolist(),
                 scores=[round(float(score), 4) for score in scores[q]])
            for q in range(len(prompts))]

def fresh_votes(panel, rows, smoothing):
    """Step 4 with --label fresh: the panel votes again on each chosen pair alone, and these
    votes, not the ones that chose the pair, are its label: for voters who draw their votes, the
    choice cannot bias them (a deterministic annotator, a reward model, answers as before)."""
    answers = panel.compare([row["prompt"] for row in rows], [row["response_a"] for row in rows],
                            [row["response_b"] for row in rows])  # (pairs, N)
    votes = answers.double().sum(-1)
    target_logit = vote_share_logit(votes, answers.shape[1], smoothing)
    for row, votes_a, p_hat, logit in zip(rows, votes.tolist(), target_logit.sigmoid().tolist(),
                                          target_logit.tolist()):
        row.update(votes_a=votes_a, n_annotators=answers.shape[1], p_hat=p_hat, target_logit=logit)

def degenerate(text_a, text_b):
    """Nothing can be learned from identical responses, or empty ones (truncated to nothing too)."""
    return text_a == text_b or not text_a.strip() or not text_b.strip()

def sampled_pairs(model, tokenizer, panel, chunk, t, args, batch_size):
    """Steps 1-4: K samples per prompt from pi_t, the panel's votes, Zermelo ranking, best vs
    worst, soft label. Returns the training rows and statistics (timings, skipped pairs)."""
    # 1. Sample K responses per prompt from pi_t.
    torch.manual_seed(phase_seed(args.seed, t, "sample"))
    tic = time.time()
    prompt_ids = [encode_prompt(tokenizer, prompt, args.max_prompt_tokens) for prompt in chunk]
    K = args.num_responses
    responses = sample(model, tokenizer, prompt_ids, K, args.temperature, args.max_new_tokens,
                       batch_size, f"iter {t + 1} sample")
    texts = decode(tokenizer, responses)
    seconds_sample = time.time() - tic

    # 2-4. The panel votes on every pair; Zermelo ranking; best vs worst; soft label.
    tic = time.time()
    panel.gen.manual_seed(phase_seed(args.seed, t, "annotate"))
    rows, skipped = [], 0
    for q, chosen in enumerate(annotate(panel, chunk, texts, K, args.smoothing, args.label)):
        a, b = q * K + chosen["best"], q * K + chosen["worst"]
        if degenerate(texts[a], texts[b]):
            skipped += 1  # nothing to learn: equal or empty responses
            continue
        rows.append(dict(prompt=chunk[q], response_a=texts[a], response_b=texts[b], **chosen,
                         prompt_ids=prompt_ids[q], a_ids=responses[a], b_ids=responses[b]))
    if args.label == "fresh" and rows:  # from a stream of their own
        panel.gen.manual_seed(phase_seed(args.seed, t, "label"))
        fresh_votes(panel, rows, args.smoothing)
    tokens = sum(len(response) for response in responses)
    ended = sum(len(response) < args.max_new_tokens or response[-1] == tokenizer.eos_token_id
                for response in responses)  # shorter than the limit (EOS or marker), or EOS last
    return rows, dict(skipped_pairs=skipped, response_tokens_mean=tokens / len(responses),
                      eos_rate=ended / len(responses),
                      seconds_sample=seconds_sample, seconds_annotate=time.time() - tic,
                      sample_tokens_per_s=tokens / seconds_sample)

def without_ties(rows, loss):
    """DPO and IPO learn from a majority, and a pair with p_hat = 1/2 has none: they skip it
    (counted in tied_pairs). The soft-label losses keep it, with target 0: equal is information."""
    if loss in ("irepo", "soft-dpo"):
        return rows, 0
    kept = [row for row in rows if abs(row["target_logit"]) > 1e-6]
    return kept, len(rows) - len(kept)

def check_targets(rows, t):
    """The pairs' target logits (P,), after checking that a pair is left to learn from and that
    every target is finite in float32 (a --pairs file can hold any number)."""
    if not rows:
        fail(f"iteration {t + 1}: no pair is left to learn from (identical or empty responses, or "
             "ties under dpo/ipo); try a higher --temperature, more --num-responses or pairs")
    target = torch.tensor([row["target_logit"] for row in rows])
    if not torch.isfinite(target).all():
        fail(f"iteration {t + 1}: a target logit is not finite in float32; try a larger "
             "--smoothing, or check the labels of --pairs")
    return target

# --- Steps 5-6: the reference log-probs, then the regression.
def reference_logprobs(model, rows, pad_id, batch_size):
    """Step 5: log pi_t of both responses of every pair, once, without gradients: the only trace
    of the reference pi_t (no second model in memory), saved with the pairs for anyone to check."""
    prompt_ids = [row["prompt_ids"] for row in rows]
    reference_a = batched_logprobs(model, prompt_ids, [row["a_ids"] for row in rows], pad_id,
                                   batch_size)
    reference_b = batched_logprobs(model, prompt_ids, [row["b_ids"] for row in rows], pad_id,
                                   batch_size)
    for row, logp_a, logp_b in zip(rows, reference_a.tolist(), reference_b.tolist()):
        row.update(logp_ref_a=logp_a, logp_ref_b=logp_b)
    return reference_a, reference_b

def fit(params, n, micro_loss, settings, desc):
    """The one training loop (step 6, and the SFT that makes pi_0): Adam, cosine schedule with
    linear warm-up, gradient clipping. Each epoch visits the n items in random order, batch_size
    per optimizer step, accumulating micro_batch_size at a time; micro_loss(indices, epoch)
    returns those items' summed loss. Many processes each take a share of every batch and take
    the same step (README)."""
    from transformers import get_cosine_schedule_with_warmup
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    for param in params:  # zeros, not None: a process whose share of a batch is empty adds zeros
        param.grad = torch.zeros_like(param)
    steps = math.ceil(n / settings.batch_size) * settings.epochs
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    with tqdm(total=steps, desc=desc, leave=False) as bar:  # closed on errors too
        for epoch in range(settings.epochs):
            order = torch.randperm(n)
            for start in range(0, n, settings.batch_size):
                batch = order[start:start + settings.batch_size]
                mine = shard(batch.tolist())  # this process's share of the batch
                for micro in range(0, len(mine), settings.micro_batch_size):
                    loss = micro_loss(mine[micro:micro + settings.micro_batch_size], epoch)
                    (loss / len(batch)).backward()  # the whole batch's mean, once summed
                total(param.grad for param in params)  # summed over the processes
                norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"the gradient became non-finite in epoch {epoch + 1}")
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=False)
                bar.update()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory

def train(model, rows, reference_a, reference_b, pad_id, args):
    """Step 6: minimize the chosen loss over the pairs, pi_t's log-probs (reference_a,
    reference_b) fixed; the model becomes pi_{t+1}. Returns the last epoch's diagnostics (each
    pair's as its forward pass saw it, before that batch's step), and the tokens seen."""
    loss_fn = LOSSES[args.loss]
    target = torch.tensor([row["target_logit"] for row in rows])
    h_last, loss_last = torch.zeros(len(rows)), torch.zeros(len(rows))  # the last epoch's

    def micro_loss(indices, epoch):
        # Both responses of every pair in one forward pass: rows [a_1..a_B, b_1..b_B].
        prompt_ids = [rows[i]["prompt_ids"] for i in indices] * 2
        response_ids = [rows[i]["a_ids"] for i in indices] + [rows[i]["b_ids"] for i in indices]
        batch = collate(prompt_ids, response_ids, pad_id, model.device)
        logps_a, logps_b = sequence_logprobs(model, *batch).cpu().split(len(indices))
        logratio_a = logps_a - reference_a[indices]
        logratio_b = logps_b - reference_b[indices]
        losses = loss_fn(logratio_a, logratio_b, target[indices], args.beta)  # (micro,)
        if epoch == args.epochs - 1:
            h_last[indices] = args.beta * (logratio_a - logratio_b).detach()
            loss_last[indices] = losses.detach()
        return losses.sum()
    settings = training(args, args.lr, args.epochs)
    with trainable(model, settings) as params:
        fit(params, len(rows), micro_loss, settings, "train")
    total([h_last, loss_last])  # each process filled in its share of the pairs
    tokens = args.epochs * sum(2 * len(row["prompt_ids"]) + len(row["a_ids"]) + len(row["b_ids"])
                               for row in rows)
    return dict(loss=float(loss_last.mean()), regression_mse=float(((h_last - target) ** 2).mean()),
                sign_agreement=float((torch.sign(h_last) == torch.sign(target)).float().mean()),
                reward_margin=float(h_last.mean())), tokens

# --- Step 7: evaluate pi_{t+1} against pi_0 on held-out prompts.
def held_out_samples(model, tokenizer, held_out, args, batch_size, desc):
    """One response per (repeated) held-out prompt at the sampling temperature, for the win-rate
    and the reward; for the KL, whose estimate needs samples of the policy itself, responses at
    temperature 1 (the same ones when that is the sampling temperature) and their log-probs."""
    responses = sample(model, tokenizer, held_out.prompt_ids, 1, args.temperature,
                       args.max_new_tokens, batch_size, desc)
    kl_responses = responses
    if args.temperature != 1.0:
        kl_responses = sample(model, tokenizer, held_out.prompt_ids, 1, 1.0, args.max_new_tokens,
                              batch_size, desc + " at T = 1")
    kl_logps = batched_logprobs(model, held_out.prompt_ids, kl_responses, tokenizer.pad_token_id,
                                batch_size)
    return Samples(responses, decode(tokenizer, responses), kl_responses, kl_logps)

def evaluate(model, tokenizer, panel, held_out, previous, t, args, batch_size):
    """pi_{t+1}'s held-out samples; its win-rate against pi_0's and true reward; the KL from
    pi_t (whose samples are `previous`) and from pi_0. Returns (metrics, pi_{t+1}'s Samples)."""
    torch.manual_seed(phase_seed(args.seed, t, "eval"))
    panel.gen.manual_seed(phase_seed(args.seed, t, "eval_votes"))  # a stream of its own
    current = held_out_samples(model, tokenizer, held_out, args, batch_size, f"iter {t + 1} eval")
    win_rate = panel.compare(held_out.prompts, current.texts, held_out.initial.texts).mean()
    true_reward = panel.reward(current.texts)
    # KL(pi_t || pi_{t+1}), KL(pi_0 || pi_{t+1}): unbiased means of log p - log q over the samples
    # that pi_t and pi_0 drew at temperature 1 (README): not the objective's KL(pi || pi_ref).
    def kl_from(earlier):  # earlier: the Samples of pi_t or pi_0
        logps = batched_logprobs(model, held_out.prompt_ids, earlier.kl_responses,
                                 tokenizer.pad_token_id, batch_size)  # log pi_{t+1}
        return float((earlier.kl_logps - logps).mean())
    return dict(win_rate_vs_initial=float(win_rate),
                true_reward=None if true_reward is None else float(true_reward.mean()),
                kl_to_reference=kl_from(previous), kl_to_initial=kl_from(held_out.initial)), current

# --- The loop. From Part II: start_run checks every input, splits the prompts into held-out ones
# and T disjoint chunks, loads pi_t and builds the panel; given_pairs replaces steps 1-4 with
# --pairs; training/trainable choose what trains (fresh LoRA adapters, frozen after, or every
# weight); shard/gather/total split the work among processes; phase_seed seeds each phase.
def run(args):
    """Steps 1-7 for t = 0..T-1. Returns the list of metrics dicts, one per iteration."""
    state = start_run(args)  # input checked, pi_t loaded (t = 0, or where --resume continues)
    if state.start == 0:
        # pi_0's responses to the held-out prompts: every iteration is compared with these.
        torch.manual_seed(phase_seed(args.seed, 0, "initial"))  # a stream of their own
        state.held_out.initial = held_out_samples(state.model, state.tokenizer, state.held_out,
                                                  args, state.sample_batch, "sample pi_0")
        state.latest = state.held_out.initial
        save_initial(state)
    for t in range(state.start, args.iterations):
        # 1-4. Sample, annotate, rank, keep best vs worst, label (or take the given pairs).
        if state.given:
            rows, stats = given_pairs(state.tokenizer, state.given[t], args.max_prompt_tokens)
        else:
            rows, stats = sampled_pairs(state.model, state.tokenizer, state.panel,
                                        state.chunks[t], t, args, state.sample_batch)
        rows, tied = without_ties(rows, args.loss)
        target = check_targets(rows, t)

        # 5. log pi_t of both responses, once, without gradients.
        tic = time.time()
        reference_a, reference_b = reference_logprobs(state.model, rows, state.pad_id,
                                                      args.micro_batch_size)
        seconds_reference = time.time() - tic

        # 6. Minimize the loss over the pairs: the model becomes pi_{t+1}.
        peak_memory_mb(state.device, reset=True)
        torch.manual_seed(phase_seed(args.seed, t, "train"))
        tic = time.time()
        try:
            fitted, tokens = train(state.model, rows, reference_a, reference_b, state.pad_id, args)
        except FloatingPointError as error:
            fail(f"iteration {t + 1}: {error} (the targets are finite: the model diverged); try "
                 f"a lower --lr ({t} complete iterations are kept in {args.out}/)")
        seconds_train = time.time() - tic

        # 7. Evaluate pi_{t+1}: win-rate against pi_0 and true reward on held-out prompts; KL.
        tic = time.time()
        evaluation, state.latest = evaluate(state.model, state.tokenizer, state.panel,
                                            state.held_out, state.latest, t, args,
                                            state.sample_batch)
        metrics = dict(
            iteration=t + 1, loss_type=args.loss, label=args.label, **fitted, **evaluation,
            target_logit_mean=float(target.mean()), pairs=len(rows), tied_pairs=tied, **stats,
            seconds_reference=seconds_reference, seconds_train=seconds_train,
            seconds_eval=time.time() - tic, train_tokens_per_s=tokens / seconds_train,
            peak_memory_mb=peak_memory_mb(state.device))
        finish_iteration(state, t, rows, metrics)
    if state.start < args.iterations:
        show_samples(state, args)
    return state.history

# =============================================================================================
# PART II. THE MACHINERY. Nothing below changes the method: the command line, files, model
# loading, LoRA, the annotators, the tiny world, many processes, runs that stop, main.
# =============================================================================================

# --- The command line: the settings of Part I as flags, checked as they are read.
def fail(message):
    """Stop: one line on stderr, exit status 2, no traceback; under torchrun, from process 0."""
    if RANK:  # every process meets the same bad input; torchrun stops this one when 0 has exited
        time.sleep(10)
    print(f"irepo.py: error: {message}", file=sys.stderr)
    sys.exit(2)

COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}

def bounds(rule):
    """The comparisons that a rule of SETTINGS states, e.g. '>= 0 and < 1' -> [(>=, 0.0),
    (<, 1.0)]: each an operator, a space and a number (decimals too); a parenthesis explains."""
    statement = rule.split("(")[0]
    found = re.findall(r"(>=|<=|>|<) (-?\d+(?:\.\d+)?(?:e-?\d+)?)", statement)
    return [(COMPARISONS[operator_text], float(number)) for operator_text, number in found]

def checked(flag, kind, rule):
    """A type= for argparse: the value, or one line and exit 2 unless it satisfies `rule`."""
    def parse(text):
        if text == "auto" and rule.endswith("auto"):
            return text
        value = kind(text)  # a ValueError here is argparse's own "invalid float value"
        within = all(compare(value, bound) for compare, bound in bounds(rule))
        if not (math.isfinite(value) and within):
            fail(f"{flag} {value}: must be {rule}")
        return value
    parse.__name__ = kind.__name__
    return parse

def preset_for(model):
    """Mistral-7B's preset for its names (base and Instruct), tiny's for 'tiny', else Phi-2's."""
    name = model.rstrip("/").lower()
    if name == "tiny":
        return "tiny"
    if name.startswith("mistralai/mistral-7b"):
        return "mistral-7b"
    return "phi-2"

def build_parser():
    """Every flag: the run's own, then one per SETTINGS entry (None: the preset's value)."""
    import argparse
    parser = argparse.ArgumentParser(
        description="iREPO: iterative alignment by regression on empirical preferences.")
    parser.error = fail  # one line and exit status 2, instead of usage + message
    add = parser.add_argument
    add("--model", default="tiny", help="'tiny' (built in, offline), a Hugging Face name or folder")
    add("--preset", choices=sorted(PRESETS), help="settings to start from (default: by --model)")
    add("--out", default="out", help="output folder: iterations, pairs, metrics")
    add("--prompts", help="FILE: .txt, a prompt a line, or .jsonl with a 'prompt' string a "
        "line; 'tiny': the tiny world's templates (the tiny model's default); else UltraFeedback's")
    add("--pairs", help="FILE: labelled pairs (pairs.jsonl format) instead of steps 1-4")
    add("--sft", help="FILE: chat 'messages' JSONL to fine-tune --model on first (pi_0)")
    start = parser.add_mutually_exclusive_group()  # --resume or --overwrite, not both
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out after its last iteration")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (keeps warm-up and SFT)")
    add("--seed", type=int, default=0, help="seeds every random stream")
    mode = parser.add_mutually_exclusive_group()  # two other programs, one at a time
    mode.add_argument("--theory", action="store_true",
                      help="print numerical checks of the paper's theory, exit")
    mode.add_argument("--compare", action="store_true",
                      help="reward-KL frontier of irepo (2 labels), soft-dpo, dpo, ipo")
    for name, (kind, rule, default, meaning) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            add(flag, action=argparse.BooleanOptionalAction, help=meaning)
        elif isinstance(rule, tuple):
            add(flag, choices=rule, help=meaning)
        elif rule:
            add(flag, type=checked(flag, kind, rule), help=meaning)
        else:
            add(flag, type=kind, help=meaning)
    return parser

def parse_args(argv=None):
    """The flags, with what they leave unset filled in from the preset, then from tiny's."""
    args = build_parser().parse_args(argv)
    args.preset = args.preset or preset_for(args.model)
    tiny = {name: spec[2] for name, spec in SETTINGS.items()}
    for name, value in (tiny | PRESETS[args.preset]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model != "tiny":
        check_model(f"--model {args.model}", args.model)
    args.annotator_specs = parse_annotators(args.annotators, args.num_annotators)
    if args.lora_alpha is None:  # alpha = rank: the adapters' update at scale 1, in every preset
        args.lora_alpha = float(args.lora_rank)
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
    local = is_path(name) or os.path.isdir(name)
    why = "not a model folder" if local else "cannot be downloaded: no network, or no such model"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    fail(f"{label}: cannot be loaded ({why}; {first_line}); {hint}")

DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the weights' dtype on each device

def kv_cache_bytes(config, tokens, dtype_bytes=2):
    """The KV cache of one sequence of `tokens` tokens: K and V in every layer, in bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes * tokens

def sample_batch(model, args, device):
    """--sample-batch-size, 'auto' resolved: on CUDA the most prompts whose KV cache (K sequences,
    prompt + new tokens) fits in half the memory left after the weights; elsewhere 16."""
    if args.sample_batch_size != "auto":
        return args.sample_batch_size
    if device.type != "cuda":
        return 16
    per_prompt = args.num_responses * kv_cache_bytes(
        model.config, args.max_prompt_tokens + args.max_new_tokens, model.dtype.itemsize)
    free = torch.cuda.mem_get_info(device)[0]
    size = max(1, int(free / 2 // per_prompt))  # the other half: annotators, logits
    print(f"sample batch: {size} prompts per generate() call ({per_prompt / 2**30:.2f} GiB of KV "
          f"cache each, {free / 2**30:.0f} GiB free after the weights)")
    return size

def peak_memory_mb(device, reset=False):
    """Peak memory so far: CUDA's allocations on a GPU, the process's peak RSS elsewhere."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**20

# --- Prompts and given pairs: the built-in list or files, checked line by line before any work.
def read_lines(path, flag):
    """The lines of a UTF-8 text file, or one clear error naming the flag and the file."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().splitlines()
    except UnicodeDecodeError as error:
        fail(f"{flag} {path}: not UTF-8 text ({error.reason} at byte {error.start}); "
             "re-save it as UTF-8")
    except OSError as error:
        fail(f"{flag} {path}: cannot be read ({error.strerror})")

def read_jsonl(path, flag):
    """(where, object) for every non-empty line of a JSONL file; `where` is 'file:line'."""
    for number, line in enumerate(read_lines(path, flag), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})")
        if not isinstance(row, dict):
            fail(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{number}", row

def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def is_text(value):
    return isinstance(value, str) and bool(value.strip())

def is_token_ids(value):
    """A list of token ids, or None (absent)."""
    return value is None or (isinstance(value, list)
                             and all(isinstance(token, int) and token >= 0 for token in value))

def check(row, where, field, is_valid, expected):
    """row[field] if is_valid(row[field]); else one line naming the line, field and value."""
    if not is_valid(row.get(field)):
        fail(f"{where}: field '{field}' must be {expected}, got {row.get(field)!r}")
    return row.get(field)

def read_prompts(path):
    """Prompts: the non-empty lines of a .txt file, or the 'prompt' string of each .jsonl line."""
    if path.endswith(".jsonl"):
        prompts = [check(row, where, "prompt", is_text, "a non-empty string").strip()
                   for where, row in read_jsonl(path, "--prompts")]
    else:
        prompts = [line.strip() for line in read_lines(path, "--prompts") if line.strip()]
    if not prompts:
        fail(f"--prompts {path}: the file holds no prompt")
    return prompts

# UltraFeedback, the paper's prompts: one JSONL file per source at the top of the dataset
# repository, an 'instruction' string a line (named here, since listing them needs the network).
ULTRAFEEDBACK = "openbmb/UltraFeedback"
ULTRAFEEDBACK_FILES = ["evol_instruct.jsonl", "false_qa.jsonl", "flan.jsonl", "sharegpt.jsonl",
                       "truthful_qa.jsonl", "ultrachat.jsonl"]

def ultrafeedback_prompts():
    """UltraFeedback's distinct instructions, in file order. The files (about 0.9 GB with their
    responses and ratings) are downloaded once into the hub's cache; later runs read them there,
    offline too (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download
    print(f"prompts: reading {ULTRAFEEDBACK}'s {len(ULTRAFEEDBACK_FILES)} files from the hub's "
          "cache (the first run downloads them, about 0.9 GB)")
    prompts = {}  # the distinct instructions, in the order first seen
    for name in ULTRAFEEDBACK_FILES:
        try:
            path = hf_hub_download(ULTRAFEEDBACK, name, repo_type="dataset")
        except Exception as error:  # offline, no network, refused, cut off: one line, any cause
            cause = error.__cause__ or error  # the hub wraps the connection's own error
            why = (str(cause).strip().splitlines() or [""])[0]
            fail(f"the prompts: {ULTRAFEEDBACK}/{name} is not in the hub's cache and cannot be "
                 f"downloaded ({type(cause).__name__}: {why}); give --prompts FILE (the README's "
                 "'Prompts' shows how to make UltraFeedback's), or --prompts tiny for a smoke test")
        for _, row in read_jsonl(path, "--prompts"):
            if is_text(row.get("instruction")):
                prompts[row["instruction"].strip()] = None
    if not prompts:
        fail(f"the prompts: {ULTRAFEEDBACK} holds no 'instruction'; give --prompts FILE")
    return list(prompts)

def load_prompts(args):
    """The prompts and where they come from: --prompts FILE; the template prompts for 'tiny'
    (the tiny model's default); else UltraFeedback's instructions, as in the paper."""
    if args.prompts == "tiny" or (args.prompts is None and args.model == "tiny"):
        return tiny_prompts(), "template prompts of the tiny world"
    if args.prompts:
        return read_prompts(args.prompts), f"prompts from {args.prompts}"
    return ultrafeedback_prompts(), f"distinct instructions of UltraFeedback ({ULTRAFEEDBACK})"

def replies(messages):
    """The indices of the assistant turns that answer a user turn."""
    return [i for i, message in enumerate(messages)
            if message["role"] == "assistant" and i and messages[i - 1]["role"] == "user"]

def is_message(value):  # a chat turn
    return (isinstance(value, dict) and isinstance(value.get("role"), str)
            and isinstance(value.get("content"), str))

def read_conversations(path):
    """--sft: a chat 'messages' list per line, with an assistant turn after a user turn."""
    conversations = []
    for where, row in read_jsonl(path, "--sft"):
        messages = row.get("messages")
        if not (isinstance(messages, list) and all(is_message(turn) for turn in messages)):
            fail(f"{where}: field 'messages' must be a list of {{'role', 'content'}} strings")
        conversation = [{"role": turn["role"], "content": turn["content"]} for turn in messages]
        if not replies(conversation):
            fail(f"{where}: field 'messages' has no assistant turn after a user turn")
        conversations.append(conversation)
    if not conversations:
        fail(f"--sft {path}: the file holds no conversation")
    return conversations

def sft_examples(tokenizer, conversations, args):
    """(prompt_ids, response_ids) per reply: the conversation before it in the chat template;
    the reply, then the end-of-turn marker (else EOS) for pi_0 to learn, cut at --max-new-tokens."""
    def token_ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    marker = end_of_turn(tokenizer)
    end_ids = token_ids(marker) if marker else [tokenizer.eos_token_id]
    examples = []
    for messages in conversations:
        for i in replies(messages):
            prompt_ids = encode_prompt(tokenizer, messages[:i], args.max_prompt_tokens)
            response_ids = (token_ids(messages[i]["content"]) + end_ids)[:args.max_new_tokens]
            examples.append((prompt_ids, response_ids))
    return examples

def pair_target(row, where, smoothing):
    """logit p_hat of a given pair: a Zermelo label's saved 'target_logit'; else the votes
    ('votes_a' of 'n_annotators', smoothed as for sampled pairs); else 'p_hat' (not smoothed)."""
    if row.get("label") == "zermelo":
        return check(row, where, "target_logit", is_number, "a number (the Zermelo label)")
    if "votes_a" not in row:
        p_hat = check(row, where, "p_hat", lambda value: is_number(value) and 0 < value < 1,
                      "a number strictly between 0 and 1 (or give 'votes_a' and 'n_annotators')")
        return math.log(p_hat) - math.log1p(-p_hat)
    n_annotators = check(row, where, "n_annotators",
                         lambda value: is_number(value) and value >= 1, "a number >= 1")
    votes_a = check(row, where, "votes_a",
                    lambda value: is_number(value) and 0 <= value <= n_annotators,
                    "a number in [0, n_annotators]")
    return float(vote_share_logit(torch.tensor(float(votes_a), dtype=torch.float64),
                                  n_annotators, smoothing))

def read_pairs(path, smoothing):
    """(file:line, pair) for each line, in iteration_t/pairs.jsonl's format: 'prompt', 'response_a',
    'response_b', a label (see pair_target), and token ids if any (a saved pair is then exact)."""
    rows = []
    for where, row in read_jsonl(path, "--pairs"):
        check(row, where, "prompt", is_text, "a non-empty string")
        for field in ("response_a", "response_b"):
            check(row, where, field, lambda value: isinstance(value, str), "a string")
        for field in ("prompt_ids", "a_ids", "b_ids"):
            check(row, where, field, is_token_ids, "a list of token ids")
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
    def response_ids(text):  # ended by EOS, as a sampled response is
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    rows = []
    for where, row in chunk:
        if degenerate(row["response_a"], row["response_b"]):
            continue
        prompt_ids = row.get("prompt_ids") or encode_prompt(tokenizer, row["prompt"], max_tokens)
        a_ids = row.get("a_ids") or response_ids(row["response_a"])
        b_ids = row.get("b_ids") or response_ids(row["response_b"])
        if max(prompt_ids + a_ids + b_ids) >= len(tokenizer):
            fail(f"{where}: token ids exceed the vocabulary of --model {tokenizer.name_or_path}")
        rows.append(dict(row, prompt_ids=prompt_ids, a_ids=a_ids, b_ids=b_ids))
    lengths = [len(row[side]) for row in rows for side in ("a_ids", "b_ids")]
    return rows, dict(skipped_pairs=len(chunk) - len(rows),
                      response_tokens_mean=sum(lengths) / len(lengths) if lengths else 0.0,
                      eos_rate=None, seconds_sample=0.0, seconds_annotate=0.0,
                      sample_tokens_per_s=None)

# --- Chat formats: a prompt in the tokenizer's chat template; responses as the annotators see them.
def encode_prompt(tokenizer, prompt, max_tokens=None):
    """Token ids of a prompt in the tokenizer's chat template (load_policy gives every tokenizer
    one). A prompt longer than max_tokens keeps its end, where the template asks for a reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has any BOS
    return ids[-max_tokens:] if max_tokens else ids

def end_of_turn(tokenizer):
    """The chat format's end-of-turn marker when it is not EOS: '<|im_end|>' for ChatML."""
    return "<|im_end|>" if "<|im_end|>" in (tokenizer.chat_template or "") else None

def decode(tokenizer, responses):
    """The texts annotators see: special tokens and the end-of-turn marker left out."""
    marker = end_of_turn(tokenizer)
    texts = [tokenizer.decode(response, skip_special_tokens=True) for response in responses]
    return [(text.split(marker)[0] if marker else text).strip() for text in texts]

# --- Model loading. CHAT_TEMPLATES: prompt formats for tokenizers that bring none of their own.
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
    except (OSError, ValueError, ImportError) as error:
        load_error(f"--model {args.model}", folder, error, "use --model tiny or a local folder")
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
    if args.lora_rank:
        check_lora_layers(model, args)
    return model, tokenizer

def check_lora_layers(model, args):
    """Before any work: stop if no layer would get an adapter; else say how many will, and how
    many parameters train (rank * (in + out) each)."""
    layers = lora_layers(model, args.lora_targets, preset_targets(args))
    if not layers:
        linear = sorted({name.split(".")[-1] for name, module in model.named_modules()
                         if is_linear(module)})
        fail(f"--lora-targets {args.lora_targets}: no linear layer of {args.model} has that "
             f"name; its linear layers are {','.join(linear)}")
    names = sorted({name.split(".")[-1] for name in layers})
    sizes = [model.get_submodule(name).weight.shape for name in layers]
    trainable_count = sum(args.lora_rank * (rows + columns) for rows, columns in sizes)
    print(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha:g}, adapters on {len(layers)} "
          f"linear layers ({','.join(names)}): {trainable_count:,} trainable parameters")

# --- Where a sampled response ends (sample() in Part I cuts each row with these).
def end_of_response(row, stops):
    """The length of a sampled row up to and including its first stop token (all if none)."""
    for position, token in enumerate(row):
        if token in stops:
            return position + 1
    return len(row)

def cut_at_marker(tokenizer, row, marker):
    """The length of the shortest prefix of `row` whose text holds `marker` (len(row) if none
    shorter does). A binary search: once a prefix holds the marker, every longer one does."""
    low, high = 0, len(row)
    while low < high:
        middle = (low + high) // 2
        if marker in tokenizer.decode(row[:middle]):
            high = middle
        else:
            low = middle + 1
    return low

# --- What trains: the settings that fit() reads, and the parameters, LoRA adapters or every
# weight (step 6 and the SFT).
@dataclass
class Training:
    """What fit() and trainable() read: the optimizer's settings and the parameters to train."""
    lr: float
    epochs: int
    batch_size: int
    micro_batch_size: int
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0: every weight trains
    lora_alpha: float = 0.0
    lora_targets: str = ""
    lora_fallback: bool = False  # the targets are a preset's: adapt all if the model lacks any
    gradient_checkpointing: bool = False

def training(args, lr, epochs):
    """The run's Training settings, with one phase's learning rate and epochs (step 6, SFT)."""
    return Training(lr=lr, epochs=epochs, batch_size=args.batch_size,
                    micro_batch_size=args.micro_batch_size, warmup_ratio=args.warmup_ratio,
                    max_grad_norm=args.max_grad_norm, lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                    lora_fallback=preset_targets(args),
                    gradient_checkpointing=args.gradient_checkpointing)

@contextlib.contextmanager
def trainable(model, settings):
    """The parameters to train: fresh LoRA adapters (lora_rank r > 0), frozen on exit so that
    they stay part of the model as trained, or every weight."""
    if settings.lora_rank:
        params = add_lora(model, settings.lora_rank, settings.lora_alpha,
                          lora_layers(model, settings.lora_targets, settings.lora_fallback))
    else:
        params = list(model.parameters())
        model.requires_grad_(True)
    if settings.gradient_checkpointing:
        checkpointing(model, True)
        model.train()  # checkpointing runs in train mode only; dropout was zeroed at load
    try:
        yield params
    finally:
        model.eval()
        if settings.gradient_checkpointing:
            checkpointing(model, False)
        for _, module in lora_wrappers(model):
            module.freeze()
        model.requires_grad_(False)

def checkpointing(model, on):
    """Recompute activations in the backward pass, or stop: transformers 5.25 names it activation
    checkpointing (the gradient_checkpointing_* names warn, and go in v6); earlier 5.x, gradient."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        return getattr(model, f"{name}_checkpointing_enable")({"use_reentrant": False})
    return getattr(model, f"{name}_checkpointing_disable")()

# --- LoRA, in the file: fresh adapters on the chosen linear layers each iteration (and SFT),
# frozen after it, kept in fp32 and never merged into bf16 weights, where rounding would lose most
# of a small update (README): training, evaluation, the next reference and --resume compute one
# and the same function. A and B are the LoRA paper's two low-rank factors.
def is_linear(module):
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's

class LoRALinear(torch.nn.Module):
    """base(hidden) + the sum of (alpha / rank) B A hidden over its adapters, in fp32 whatever the
    base's dtype: the frozen ones, in the order they trained, then the one training now."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.transposed = not isinstance(base, torch.nn.Linear)  # Conv1D stores W as (in, out)
        self.frozen = []  # (A, B, scale) of every earlier adapter
        self.A = self.B = self.scale = None  # the adapter that trains, if any

    def add_adapter(self, rank, alpha):
        """A fresh adapter, B = 0: the layer computes exactly what it did before."""
        weight = self.base.weight.T if self.transposed else self.base.weight  # (out, in)
        d_out, d_in = weight.shape
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.empty(rank, d_in, device=self.base.weight.device))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank, device=self.base.weight.device))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        return [self.A, self.B]

    def freeze(self):
        """The trained adapter, if any, joins the frozen ones; the layer's function is unchanged."""
        if self.A is not None:
            self.frozen.append((self.A.detach(), self.B.detach(), self.scale))
            self.A = self.B = self.scale = None

    def forward(self, hidden):
        training = [(self.A, self.B, self.scale)] if self.A is not None else []
        hidden_fp32 = hidden.float()  # upcast once, however many adapters the layer has
        update = 0.0
        for A, B, scale in self.frozen + training:
            update = update + scale * (hidden_fp32 @ A.T @ B.T)
        return self.base(hidden) + update.to(hidden.dtype)

def preset_targets(args):
    """Whether --lora-targets is the preset's own value (not given, or given the same)."""
    tiny = SETTINGS["lora_targets"][2]
    return args.lora_targets == PRESETS[args.preset].get("lora_targets", tiny)

def lora_layers(model, targets, fallback=False):
    """The names of the linear layers to adapt: those whose own name (after the last dot) is a
    target (comma-separated); an adapted layer counts under its own name. With fallback, if the
    model lacks a target (a preset made for another architecture): every linear but the head."""
    wanted = {target.strip() for target in targets.split(",") if target.strip()}
    adapted = dict(lora_wrappers(model))
    inside = {name + ".base" for name in adapted}  # the layers that adapted ones wrap
    linear = [name for name, module in model.named_modules()
              if name in adapted or (is_linear(module) and name not in inside)]
    if fallback and not wanted <= {name.split(".")[-1] for name in linear}:
        head = model.get_output_embeddings()
        return [name for name in linear if model.get_submodule(name) is not head]
    return [name for name in linear if name.split(".")[-1] in wanted]

def lora_wrappers(model):
    """(name, LoRALinear) of every adapted layer."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoRALinear)]

def swap(model, name, module):
    """Put `module` where the model's submodule `name` (e.g. 'transformer.h.0.attn.c_attn') is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

def add_lora(model, rank, alpha, layer_names):
    """Freeze the model and give each named layer a fresh adapter (wrapping it in LoRALinear the
    first time); returns the adapters' parameters."""
    model.requires_grad_(False)
    params = []
    for name in layer_names:
        if not isinstance(model.get_submodule(name), LoRALinear):
            swap(model, name, LoRALinear(model.get_submodule(name)))
        params += model.get_submodule(name).add_adapter(rank, alpha)
    return params

def install_adapters(model, adapters):
    """Give each named layer its saved adapters (adapters.pt: {layer name: [(A, B, scale), ...]}
    in training order), frozen: the policy as it trained."""
    for name, frozen in adapters.items():
        wrapper = LoRALinear(model.get_submodule(name))
        wrapper.frozen = [(A.to(model.device), B.to(model.device), scale) for A, B, scale in frozen]
        swap(model, name, wrapper)

@torch.no_grad()
def plain_state_dict(model):
    """The weights as a plain model's, for save_pretrained: each adapted layer's weight is the
    base plus its adapters, added in fp32 and rounded once to the weights' dtype (on the CPU)."""
    adapted = dict(lora_wrappers(model))
    state = {}
    for key, value in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        layer = name[:-len(".base")]
        if name.endswith(".base") and layer in adapted:
            name = layer
            if leaf == "weight":
                delta = sum(scale * (B @ A) for A, B, scale in adapted[layer].frozen)
                delta = delta.T if adapted[layer].transposed else delta
                value = (value.float() + delta).to(value.dtype).cpu()
        state[f"{name}.{leaf}"] = value
    return state

# --- The annotators (Part I's Panel stacks their answers). --annotators is a comma-separated list:
#   sim[:N]      N simulated Bradley-Terry annotators (default N: --num-annotators) who like
#                positive words: the tiny world's true reward, which only they know
#   judge:MODEL  a causal LM asked which response is better, in both orders
#   rm:MODEL     a scalar reward model (sequence classifier): p = sigma(r_a - r_b)
# Each has compare(prompts, texts_a, texts_b) -> (P, answers per pair), and reward(texts) -> (P,)
# true rewards where it knows them (only the simulated annotators do), else None.
POSITIVE = "great good lovely wonderful fun amazing".split()
NEGATIVE = "bad awful boring terrible dull poor".split()

def hidden_rewards(texts):
    """The simulated annotators' reward: (# positive words) - (# negative words), per text."""
    rewards = []
    for text in texts:
        words = text.split()
        rewards.append(sum(word in POSITIVE for word in words)
                       - sum(word in NEGATIVE for word in words))
    return torch.tensor(rewards, dtype=torch.float32)

@dataclass
class SimulatedAnnotators:
    """n Bradley-Terry annotators sharing the hidden reward (they like positive words): each
    votes for a with probability sigma(sharpness * (r(a) - r(b)))."""
    n_annotators: int
    sharpness: float
    gen: torch.Generator  # the panel's random stream

    def compare(self, prompts, texts_a, texts_b):  # -> (P, n) votes in {0, 1}
        difference = hidden_rewards(texts_a) - hidden_rewards(texts_b)
        probability = torch.sigmoid(self.sharpness * difference)
        return torch.bernoulli(probability[:, None].expand(-1, self.n_annotators),
                               generator=self.gen)

    def reward(self, texts):
        return hidden_rewards(texts)

def parse_annotators(spec, num_annotators):
    """'sim:4,rm:NAME' -> [('sim', 4), ('rm', 'NAME')]; stops with a clear line if malformed.
    A bare 'sim' has num_annotators annotators."""
    specs = []
    for item in [part.strip() for part in spec.split(",")]:
        kind, _, argument = item.partition(":")
        if kind == "sim" and (not argument or (argument.isdigit() and int(argument) >= 1)):
            specs.append(("sim", int(argument) if argument else num_annotators))
        elif kind in ("judge", "rm") and argument:
            check_model(f"--annotators {kind}:{argument}", argument)
            specs.append((kind, argument))
        elif kind == "human":
            fail(f"--annotators {spec}: people are not asked at the terminal; collect their votes "
                 "and give the pairs with --pairs (votes_a, n_annotators per pair)")
        else:
            fail(f"--annotators {spec}: cannot read '{item}'; use sim[:N], judge:MODEL or "
                 "rm:MODEL, separated by commas")
    return specs

JUDGE_QUESTION = ("Which response follows the instruction better?\n\nInstruction:\n{prompt}\n\n"
                  "Response A:\n{a}\n\nResponse B:\n{b}\n\nAnswer with a single letter, A or B.")

@dataclass
class ModelAnnotator:
    """An annotator that is a model: it reads batch_size inputs at a time, each cut to
    max_tokens tokens. It does not know the true reward."""
    model: torch.nn.Module
    tokenizer: object
    batch_size: int
    max_tokens: int

    def reward(self, texts):
        return None

@dataclass
class JudgeAnnotator(ModelAnnotator):
    """A causal LM as a judge: P(a is better) from its next-token logits for the labels A and B,
    asked with a first and with b first, averaged, so that an LLM judge's position bias cancels."""

    def __post_init__(self):
        self.labels = [self.tokenizer(label, add_special_tokens=False)["input_ids"][-1]
                       for label in ("A", "B")]
        if self.labels[0] == self.labels[1]:
            raise ValueError("its tokenizer cannot tell the labels 'A' and 'B' apart")

    @torch.no_grad()
    def compare(self, prompts, texts_a, texts_b):
        question_ids = []  # every pair twice: first with a as Response A, then with b
        for prompt, first, second in zip(prompts * 2, texts_a + texts_b, texts_b + texts_a):
            question = JUDGE_QUESTION.format(prompt=prompt, a=first, b=second)
            question_ids.append(encode_prompt(self.tokenizer, question, self.max_tokens))
        label_a, label_b = self.labels
        first_better = []  # P(Response A is better), one per question
        for start in range(0, len(question_ids), self.batch_size):
            batch = left_pad(question_ids[start:start + self.batch_size],
                             self.tokenizer.pad_token_id, self.model.device)
            logits = last_logits(self.model, *batch, keep=1)[:, -1].float()  # (B, V)
            first_better += torch.sigmoid(logits[:, label_a] - logits[:, label_b]).tolist()
        # P(a is better): asked with a first, and 1 - P(b is better) asked with b first, averaged.
        a_first, b_first = torch.tensor(first_better).split(len(prompts))
        return ((a_first + 1 - b_first) / 2)[:, None]  # (P, 1)

class RewardModelAnnotator(ModelAnnotator):
    """A scalar reward model scores each distinct response once; p(a > b) = sigma(r_a - r_b)."""

    @torch.no_grad()
    def scores(self, prompts, texts):
        """The reward of each (prompt, response text): (P,) float32."""
        rewards = []
        for start in range(0, len(texts), self.batch_size):
            batch_prompts = prompts[start:start + self.batch_size]
            batch_texts = texts[start:start + self.batch_size]
            if self.tokenizer.chat_template:  # a chat RM scores the conversation, as one text
                conversations = [[{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": text}]
                                 for prompt, text in zip(batch_prompts, batch_texts)]
                inputs = [self.tokenizer.apply_chat_template(conversation, tokenize=False)
                          for conversation in conversations]
                input_pairs = None
            else:  # the others score the prompt and the response as a pair of texts
                inputs, input_pairs = batch_prompts, batch_texts
            encoded = self.tokenizer(inputs, input_pairs, padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt")
            logits = self.model(**encoded.to(self.model.device)).logits
            rewards.append(logits[:, 0].float().cpu())
        return torch.cat(rewards)

    def compare(self, prompts, texts_a, texts_b):
        distinct = sorted(set(zip(prompts, texts_a)) | set(zip(prompts, texts_b)))
        rewards = self.scores([prompt for prompt, _ in distinct], [text for _, text in distinct])
        reward_of = dict(zip(distinct, rewards.tolist()))  # (prompt, text) -> its reward
        reward_a = torch.tensor([reward_of[pair] for pair in zip(prompts, texts_a)])
        reward_b = torch.tensor([reward_of[pair] for pair in zip(prompts, texts_b)])
        return torch.sigmoid(reward_a - reward_b)[:, None]  # (P, 1)

def build_panel(args, device, batch_size):
    """Load every annotator of --annotators; one that cannot be loaded stops the run. A judge or
    reward model reads batch_size inputs at a time."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    generator = torch.Generator().manual_seed(args.seed)  # the simulated votes' stream
    annotators = []
    for kind, argument in args.annotator_specs:
        if kind == "sim":  # argument: the number of simulated annotators
            annotators.append(SimulatedAnnotators(argument, args.sharpness, generator))
            continue
        name = argument  # a model's hub name or folder
        judge = kind == "judge"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            if judge and not tokenizer.chat_template:
                tokenizer.chat_template = CHAT_TEMPLATES[args.chat_format]
            model_class = AutoModelForCausalLM if judge else AutoModelForSequenceClassification
            model = model_class.from_pretrained(name, dtype=DTYPE[device.type]).to(device).eval()
            model.config.pad_token_id = tokenizer.pad_token_id
            annotator_class = JudgeAnnotator if judge else RewardModelAnnotator
            max_tokens = args.max_prompt_tokens * 4  # room for the prompt and the responses
            annotators.append(annotator_class(model, tokenizer, batch_size, max_tokens))
        except (OSError, ValueError, ImportError) as error:
            load_error(f"--annotators {kind}:{name}", name, error, "use a local folder or sim")
    return Panel(annotators, generator)

# --- The tiny world: a toy language of reviews and its prompts. A warm-up on random reviews (a
# stand-in for the SFT model the paper starts from) gives pi_0 with about as many negative words
# (which the simulated annotators dislike) as positive ones.
TOPICS = ("food movie hotel book game park song class trip room "
          "city show beach team car phone cafe museum concert garden").split()
QUALIFIERS = ["", "old ", "new ", "big ", "small ", "local ", "first ", "last "]
VERBS = ["describe", "review", "tell me about", "write about"]
ASPECTS = "staff price view music story ending service crowd weather start".split()
NEUTRAL = "fine okay long quiet busy usual".split()
SPECIALS = ["<pad>", "<eos>", "<unk>", "<reply>"]

def tiny_prompts():
    """The 640 built-in prompts, e.g. 'review the old hotel': every verb, qualifier and topic."""
    prompts = []
    for verb in VERBS:
        for qualifier in QUALIFIERS:
            for topic in TOPICS:
                prompts.append(f"{verb} the {qualifier}{topic}")
    return prompts

def tiny_review(prompt, generator):
    """A random review of the prompt's topic, 1 to 3 clauses, adjectives drawn uniformly."""
    def pick(choices):  # one of the choices, uniformly, drawn from the generator
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    adjectives = POSITIVE + NEGATIVE + NEUTRAL
    clauses = [f"the {prompt.split()[-1]} was {pick(adjectives)}"]
    for _ in range(int(torch.randint(3, (1,), generator=generator))):
        clauses.append(f"the {pick(ASPECTS)} was {pick(adjectives)}")
    return " and ".join(clauses) + " ."

def build_tiny(folder, seed=0, steps=600):
    """The tiny pi_0: a word-level 2-layer GPT-2 fine-tuned on random reviews (our SFT). ~20 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted(set(" ".join(tiny_prompts() + TOPICS + ASPECTS + POSITIVE + NEGATIVE + NEUTRAL
                                + ["the was and . A B"]).split()))  # A, B: a judge's labels
    vocab = {word: i for i, word in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>",
                                        additional_special_tokens=["<reply>"])
    tokenizer.chat_template = CHAT_TEMPLATES["tiny"]  # "review the hotel <reply>"
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"],
                        pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    # One epoch of `steps` batches: a random prompt and a random review of it per example.
    batch_size = 64
    generator = torch.Generator().manual_seed(seed)
    all_prompts = tiny_prompts()
    draws = torch.randint(len(all_prompts), (steps * batch_size,), generator=generator)
    prompts = [all_prompts[int(i)] for i in draws]
    prompt_ids = {prompt: encode_prompt(tokenizer, prompt) for prompt in set(prompts)}
    examples = []
    for prompt in prompts:
        review = tokenizer(tiny_review(prompt, generator), add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids[prompt], review + [tokenizer.eos_token_id]))
    settings = Training(lr=3e-3, epochs=1, batch_size=batch_size, micro_batch_size=batch_size)
    sft(model, tokenizer, examples, settings)  # the same SFT as --sft
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    on_main(publish, folder, model, tokenizer, {})

# --- Many processes: `torchrun --nproc_per_node N irepo.py ...` runs the method on N processes, one
# GPU each (README: Many GPUs). In Part I, sample(), batched_logprobs() and Panel.compare() work on
# shard() of their inputs and gather() the results; fit() and train() sum with total(); process 0
# alone prints and writes files (on_main). Without torchrun, WORLD is 1 and these change nothing.
RANK = int(os.environ.get("RANK", 0))  # this process's number, from torchrun (0 without it)
WORLD = int(os.environ.get("WORLD_SIZE", 1))  # the number of processes (1 without torchrun)

def start_processes():
    """Join the processes torchrun started: NCCL between GPUs, gloo for CPU tensors (or alone)."""
    global tqdm
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if RANK:  # the others print nothing; their errors still reach stderr
        sys.stdout = open(os.devnull, "w")
        tqdm = functools.partial(tqdm, disable=True)

def shard(items, k=1):
    """This process's share of items, taken k at a time (a prompt's k responses stay together):
    the groups of k are dealt out in turn, group j to process j % WORLD."""
    return [item for i, item in enumerate(items) if (i // k) % WORLD == RANK]

def gather(items, k=1):
    """shard() undone: every process's share, in the original order, in every process."""
    shares = [items] * WORLD  # shares[rank]: what process `rank` holds
    if WORLD > 1:
        dist.all_gather_object(shares, items)
    groups = [[share[i:i + k] for i in range(0, len(share), k)] for share in shares]
    # shard() dealt the groups out in turn, so the original order is every process's first
    # group (process 0's, 1's, ...), then every process's second group, and so on. Process 0,
    # dealt to first, holds the most groups; in the last turn some processes may hold none.
    ordered = []
    for turn in range(len(groups[0])):
        for process_groups in groups:
            if turn < len(process_groups):
                ordered.extend(process_groups[turn])
    return ordered

def total(tensors):
    """Sum each tensor over the processes, in place: gradients, per-pair diagnostics. One
    all-reduce for them all (a call per tensor costs more than the sums on CPUs)."""
    tensors = list(tensors)
    if WORLD > 1:
        flat = torch.cat([tensor.flatten() for tensor in tensors])
        dist.all_reduce(flat)
        sums = flat.split([tensor.numel() for tensor in tensors])
        for tensor, summed in zip(tensors, sums):
            tensor.copy_(summed.view_as(tensor))

def on_main(function, *arguments):
    """function(*arguments) in process 0 alone (files are written once); the others wait for
    its result and return it too."""
    result = [None]  # filled in by process 0, then sent to the others
    if RANK == 0:
        result[0] = function(*arguments)
    if WORLD > 1:
        dist.broadcast_object_list(result)
    return result[0]

# --- Runs that stop (README): an iteration's folder is renamed into place only when complete, so a
# killed run keeps its complete iterations; --resume goes on after them, on the same random streams.
NOT_RUN_SETTINGS = {"out", "resume", "overwrite", "warmup", "theory", "compare", "annotator_specs"}
RUN_FILES = {"config.json", "metrics.jsonl", "initial_eval.json"}
PHASES = {"sample": 1, "annotate": 2, "train": 3, "eval": 4, "label": 5, "initial": 6,
          "eval_votes": 7}

def phase_seed(seed, iteration, phase):
    """A seed per phase, iteration and process: a resumed run draws what an uninterrupted one
    would. Training's is the same in every process, so that all shuffle the pairs alike."""
    rank = 0 if phase == "train" else RANK
    return (seed * 1_000_003 + iteration * 101 + PHASES[phase] + 7919 * rank) % 2**31

def write_atomic(path, text):
    """Write a file under a temporary name, then rename it: readers see all of it or none."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)

def complete_iterations(out):
    """The number k such that iteration_1 .. iteration_k are all complete (renamed into place)."""
    count = 0
    while os.path.isfile(os.path.join(out, f"iteration_{count + 1}", "metrics.json")):
        count += 1
    return count

def run_settings(args):
    """The settings that define a run, as saved in config.json and compared by --resume."""
    return {name: value for name, value in sorted(vars(args).items())
            if name not in NOT_RUN_SETTINGS}

def is_run_file(entry):
    return entry in RUN_FILES or entry.startswith("iteration_")

def changed_settings(args):
    """'--flag saved (now new)' for every setting that differs from the run saved in --out."""
    config_path = os.path.join(args.out, "config.json")
    saved = read_json(config_path) if os.path.isfile(config_path) else {}
    settings = run_settings(args)
    return [f"--{name.replace('_', '-')} {saved.get(name)} (now {settings.get(name)})"
            for name in sorted(set(saved) | set(settings)) if saved.get(name) != settings.get(name)]

def check_out(args):
    """Check --out (writable, not another run's); returns the iterations --resume skips."""
    try:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, ".write-test"), "")
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as error:
        fail(f"--out {args.out}: cannot be written ({error.strerror}); choose another folder")
    has_run = any(is_run_file(entry) for entry in os.listdir(args.out))
    if has_run and not (args.resume or args.overwrite):
        fail(f"--out {args.out} already holds a run ({complete_iterations(args.out)} complete "
             "iterations); add --resume to continue it or --overwrite to start again")
    if not args.resume:
        return 0
    if not has_run:  # job scripts that always pass --resume start here
        print(f"--resume: {args.out}/ holds no run to resume; starting one")
        return 0
    differences = changed_settings(args)
    if differences:
        fail(f"--resume: {args.out} was written with other settings: {', '.join(differences)}; "
             "rerun with the same flags, or use --overwrite")
    return complete_iterations(args.out)

def claim_out(args):
    """Clear what --overwrite replaces and a killed run left half-written; save the settings."""
    for entry in os.listdir(args.out):
        if (args.overwrite and is_run_file(entry)) or entry.endswith(".tmp"):
            path = os.path.join(args.out, entry)  # a .tmp is an iteration cut short
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    write_atomic(os.path.join(args.out, "config.json"),
                 json.dumps(run_settings(args), indent=1) + "\n")

def jsonl_line(row):
    return json.dumps(row) + "\n"

def read_json(path):
    with open(path) as file:
        return json.load(file)

def samples_json(samples):
    """initial_eval.json and eval.json: a policy's held-out responses and the log-probs of its
    temperature-1 responses; those are saved apart ('kl_responses') only when they differ."""
    saved = {"responses": samples.responses, "logps": samples.kl_logps.tolist()}
    if samples.kl_responses is not samples.responses:
        saved["kl_responses"] = samples.kl_responses
    return json.dumps(saved)

def load_samples(path, tokenizer):
    saved = read_json(path)
    return Samples(saved["responses"], decode(tokenizer, saved["responses"]),
                   saved.get("kl_responses", saved["responses"]), torch.tensor(saved["logps"]))

def publish(folder, model, tokenizer, files):
    """Save a model, its tokenizer and `files` ({name: text}) under folder.tmp, then rename it:
    a folder that exists is complete."""
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    model.save_pretrained(folder + ".tmp", state_dict=plain_state_dict(model))
    adapters = {name: module.frozen for name, module in lora_wrappers(model)}
    if adapters:  # the plain model's weights are rounded; the adapters are exact
        torch.save(adapters, os.path.join(folder + ".tmp", "adapters.pt"))
    tokenizer.save_pretrained(folder + ".tmp")
    for name, text in files.items():
        write_atomic(os.path.join(folder + ".tmp", name), text)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(folder + ".tmp", folder)

def save_iteration(out, t, model, tokenizer, rows, latest, metrics):
    """iteration_t/ (model, tokenizer, pairs, held-out samples, metrics) and metrics.jsonl; a
    write error removes the half-written folder and leaves the complete iterations intact."""
    final = os.path.join(out, f"iteration_{t}")
    try:
        publish(final, model, tokenizer, {"pairs.jsonl": "".join(map(jsonl_line, rows)),
                                          "metrics.json": jsonl_line(metrics),
                                          "eval.json": samples_json(latest)})
        write_atomic(f"{out}/metrics.jsonl", "".join(map(jsonl_line, read_metrics(out))))
    except OSError as error:
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        fail(f"writing {final} failed ({error.strerror or error}); the {t - 1} complete "
             f"iterations before it are intact; {'free some space' if full else 'fix that'}, "
             "then rerun with --resume")

def read_metrics(out):
    return [read_json(os.path.join(out, f"iteration_{number}", "metrics.json"))
            for number in range(1, complete_iterations(out) + 1)]

@dataclass
class Samples:
    """One policy's responses to the held-out prompts: at the sampling temperature (token ids,
    texts), and at temperature 1 for the KL (token ids, log-probs under the policy)."""
    responses: list
    texts: list
    kl_responses: list
    kl_logps: torch.Tensor

@dataclass
class HeldOut:
    """The held-out prompts, each repeated eval_samples times, and pi_0's responses to them."""
    prompts: list
    prompt_ids: list
    initial: Samples = None  # pi_0's, drawn once before the first iteration (or loaded)

@dataclass
class Run:
    """What the loop works with: pi_t, its tokenizer, the panel, the prompts or given pairs, the
    held-out set, and where the run starts (0, or after the iterations that --resume keeps)."""
    out: str  # --out
    start: int
    history: list  # the metrics of the complete iterations
    device: torch.device = None
    model: torch.nn.Module = None  # pi_t
    tokenizer: object = None
    pad_id: int = None
    panel: Panel = None
    chunks: list = None  # T chunks of prompts, or None with --pairs
    given: list = None  # T chunks of given pairs (--pairs), or None
    held_out: HeldOut = None
    latest: Samples = None  # pi_t's held-out samples: the evaluation's reference for KL
    sample_batch: int = None  # prompts per generate() call, 'auto' resolved

def print_start(args, device, source, held_out, chunks, given, start):
    print("config: " + " ".join(f"{name}={value}" for name, value in sorted(vars(args).items())
                                if name not in ("annotator_specs", "warmup")))
    processes = f" in {WORLD} processes" if WORLD > 1 else ""
    chunk = f"{len(given[0])} given pairs" if given else f"{len(chunks[0])} prompts"
    resuming = f"; resuming after iteration {start}" if start else ""
    print(f"prompts: {source}")
    print(f"device: {device}{processes}, {len(held_out)} held-out prompts, {len(chunks)} chunks "
          f"of {chunk}{resuming}")
    if args.model == "tiny" or given:
        return
    responses = len(chunks[0]) * args.num_responses  # the size of the job, before it starts
    tokens = responses * args.max_new_tokens
    print(f"job per iteration (T = {len(chunks)}): {len(chunks[0]):,} prompts x K "
          f"{args.num_responses} = {responses:,} responses to sample, at most {responses:,} x "
          f"--max-new-tokens {args.max_new_tokens} = {tokens:,} new tokens")
    if device.type == "cpu":
        print("note: a real checkpoint on a CPU is a smoke test; for a small one add "
              "--prompts-per-iteration 4 --eval-prompts 2 --max-new-tokens 8")

def print_initial_reward(panel, held_out):
    reward = panel.reward(held_out.initial.texts)
    if reward is not None:
        print(f"pi_0: true reward {reward.mean():.3f} on held-out prompts")

def start_run(args):
    """Every input file checked before anything expensive; then pi_t (pi_0, or on --resume the
    last complete iteration, with its and pi_0's saved held-out samples), the panel, the prompts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # see DTYPE
    prompts, source = load_prompts(args)
    held_out_prompts, chunks = split_prompts(prompts, args)
    given = None
    if args.pairs:
        given = split_pairs(read_pairs(args.pairs, args.smoothing), args.iterations)
    conversations = read_conversations(args.sft) if args.sft else None
    start = on_main(check_out, args)
    print_start(args, device, f"{len(prompts):,} {source}", held_out_prompts, chunks, given, start)
    state = Run(out=args.out, start=start, history=read_metrics(args.out)[:start])
    if start == args.iterations:
        print(f"all {start} iterations are complete in {args.out}/")
        return state
    if start:
        folder = os.path.join(args.out, f"iteration_{start}")
        model, tokenizer = load_exact(args, device, folder)
    elif conversations:
        model, tokenizer = build_sft(args, device, conversations)
    else:
        model, tokenizer = load_policy(args, device, base_model(args))
    state.sample_batch = sample_batch(model, args, device)
    panel = build_panel(args, device, state.sample_batch)
    on_main(claim_out, args)
    # Each held-out prompt eval_samples times: several responses give less noisy estimates.
    repeated = [prompt for prompt in held_out_prompts for _ in range(args.eval_samples)]
    held_out = HeldOut(repeated, [encode_prompt(tokenizer, prompt, args.max_prompt_tokens)
                                  for prompt in repeated])
    if start:
        held_out.initial = load_samples(os.path.join(args.out, "initial_eval.json"), tokenizer)
        state.latest = load_samples(os.path.join(folder, "eval.json"), tokenizer)
        print_initial_reward(panel, held_out)
    state.device, state.model, state.tokenizer = device, model, tokenizer
    state.pad_id, state.panel = tokenizer.pad_token_id, panel
    state.chunks, state.given, state.held_out = chunks, given, held_out
    return state

def save_initial(state):
    """pi_0's held-out samples, saved so that a resumed run compares with the very same ones."""
    on_main(write_atomic, os.path.join(state.out, "initial_eval.json"),
            samples_json(state.held_out.initial))
    print_initial_reward(state.panel, state.held_out)

def load_exact(args, device, folder):
    """A saved policy as it trained: with LoRA, the base model plus the folder's adapters.pt (its
    plain model has them rounded into the weights); else the folder's model itself."""
    path = os.path.join(folder, "adapters.pt")
    if not os.path.isfile(path):
        return load_policy(args, device, folder)
    model, tokenizer = load_policy(args, device, base_model(args))
    install_adapters(model, torch.load(path, map_location="cpu", weights_only=True))
    return model, tokenizer

def base_model(args):
    """The folder pi_0 starts from: the tiny warm-up, or --model."""
    return args.warmup if args.model == "tiny" else args.model

SFT_SETTINGS = ("model", "sft", "sft_lr", "sft_epochs", "seed", "lora_rank", "lora_alpha",
                "lora_targets", "batch_size", "micro_batch_size", "warmup_ratio", "max_grad_norm",
                "max_prompt_tokens", "max_new_tokens", "chat_format")

def sft(model, tokenizer, examples, settings):
    """The supervised warm-up that makes pi_0 from (prompt_ids, response_ids) examples: the mean
    NLL of each example's response tokens, by the method's own helpers."""
    def micro_loss(indices, epoch):
        prompt_ids = [examples[i][0] for i in indices]
        response_ids = [examples[i][1] for i in indices]
        input_ids, attention_mask, response_mask = collate(
            prompt_ids, response_ids, tokenizer.pad_token_id, model.device)
        logps = sequence_logprobs(model, input_ids, attention_mask, response_mask)
        return -(logps / response_mask.sum(-1)).sum()
    with trainable(model, settings) as params:
        fit(params, len(examples), micro_loss, settings, "SFT")

def sft_is_saved(path, recipe):
    return os.path.isfile(path) and read_json(path) == recipe

def build_sft(args, device, conversations):
    """pi_0 as the paper makes it: --model fine-tuned on --sft, saved as sft/ in --out and
    reused while every setting the SFT reads stays the same (--overwrite keeps it)."""
    folder = os.path.join(args.out, "sft")
    recipe = {name: getattr(args, name) for name in SFT_SETTINGS}
    if on_main(sft_is_saved, os.path.join(folder, "sft.json"), recipe):
        return load_exact(args, device, folder)
    model, tokenizer = load_policy(args, device, base_model(args))
    torch.manual_seed(args.seed)
    examples = sft_examples(tokenizer, conversations, args)
    sft(model, tokenizer, examples, training(args, args.sft_lr, args.sft_epochs))
    on_main(publish, folder, model, tokenizer, {"sft.json": json.dumps(recipe)})
    return model, tokenizer  # trained in memory: the saved copy need not be loaded again

def finish_iteration(state, t, rows, metrics):
    """Save iteration t + 1 (atomically), record its metrics and print its one line."""
    on_main(save_iteration, state.out, t + 1, state.model, state.tokenizer, rows,
            state.latest, metrics)
    state.history.append(metrics)
    print(metrics_line(metrics))

METRICS_LINE = ("iter {iteration} | loss {loss:.4f} | mse {regression_mse:.4f} "
                "| sign {sign_agreement:.2f} | win {win_rate_vs_initial:.3f} {reward}"
                "| kl_ref {kl_to_reference:.3f} | len {response_tokens_mean:.1f} "
                "| sample {seconds_sample:.1f}s annotate {seconds_annotate:.1f}s "
                "train {seconds_train:.1f}s ({train_tokens_per_s:.0f} tok/s)")

def metrics_line(metrics):
    """The one fixed-format line of an iteration (the reward only where the panel knows it)."""
    reward = metrics["true_reward"]
    shown = "" if reward is None else f"| reward {reward:+.3f} "
    return METRICS_LINE.format(**metrics, reward=shown)

def show_samples(state, args):
    """Three held-out prompts with the responses of pi_0 and of the last policy."""
    shown = zip(state.held_out.prompts, state.held_out.initial.texts, state.latest.texts)
    for prompt, before, after in list(shown)[::args.eval_samples][:3]:
        print(f"  {prompt!r}\n    pi_0: {before}\n    pi_{args.iterations}: {after}")

def resume_command(argv):
    """The command that resumes this run: its flags, less --overwrite, plus --resume."""
    flags = [flag for flag in argv if flag not in ("--overwrite", "--resume")]
    launch = f"torchrun --nproc_per_node {WORLD}" if WORLD > 1 else "python"
    return f"{launch} irepo.py {shlex.join(flags + ['--resume'])}"

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
        if RANK == 0:
            print(f"\nirepo.py: interrupted; {complete_iterations(args.out)} complete iterations "
                  f"are kept in {args.out}/. Resume with: "
                  f"{resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        sys.exit(130)
    last = history[-1]
    rewards = " -> ".join(f"{metrics['true_reward']:+.2f}" for metrics in history
                          if metrics["true_reward"] is not None)
    print(f"done in {time.time() - tic:.0f}s: win-rate vs pi_0 {last['win_rate_vs_initial']:.3f}"
          + (f", true reward {rewards}" if rewards else "") + f"; outputs in {args.out}/")

# =============================================================================================
# PART III. THE THEORY, CHECKED NUMERICALLY, AND THE LOSSES COMPARED.
# =============================================================================================

# --- The theory, checked numerically (python irepo.py --theory), in the README's tabular world:
# X prompts, Y responses each, Bradley-Terry preferences, a policy that is a table of logits.
def tabular_world(seed, prompts=4, responses=6):
    """log pi_ref (X, Y) and true rewards (X, Y), float64, drawn from a seeded normal."""
    generator = torch.Generator().manual_seed(seed)
    reference_logits = torch.randn(prompts, responses, generator=generator, dtype=torch.float64)
    rewards = torch.randn(prompts, responses, generator=generator, dtype=torch.float64)
    return torch.log_softmax(reference_logits, -1), rewards

def optimal_policy(log_ref, rewards, beta):
    """log pi* = log pi_ref + r/beta - log Z: the maximizer of E_pi[r] - beta KL(pi || pi_ref)."""
    return torch.log_softmax(log_ref + rewards / beta, -1)

def kl(log_p, log_q):
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)

def pair_indices(responses):
    """The pairs i < j of that many responses, in a fixed order: (first, second), each (pairs,)."""
    return torch.triu_indices(responses, responses, 1)

def all_draws_in_ranks(cdf, lowest, highest, k):
    """P(all k draws from pi have a rank in [lowest, highest]), where cdf[:, m] = P(rank < m);
    0 for an empty range."""
    return (cdf.gather(1, highest + 1) - cdf.gather(1, lowest)).clamp(min=0) ** k

def pair_weights(scheme, log_pi, rewards, k=4):
    """P(pair i < j) per prompt, (X, pairs): 'uniform'; 'on-policy', i and j drawn from pi;
    'best-worst', the best and worst of k draws from pi, ranked by Zermelo scores of the exact
    preferences. Each gives every pair a positive probability."""
    prompts, responses = rewards.shape
    first, second = pair_indices(responses)
    pi = log_pi.exp()
    if scheme == "uniform":
        return torch.ones(prompts, len(first), dtype=rewards.dtype)
    if scheme == "on-policy":
        return 2 * pi[:, first] * pi[:, second]
    not_self = 1 - torch.eye(responses, dtype=rewards.dtype)
    preferences = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :]) * not_self
    order = zermelo_scores(preferences, 0.0).argsort(-1)  # responses, worst first
    rank = order.argsort(-1)  # (X, Y): each response's rank, 0 = worst
    pi_in_rank_order = torch.zeros_like(pi).scatter(1, rank, pi)
    cdf = F.pad(pi_in_rank_order.cumsum(-1), (1, 0))  # (X, Y + 1), cdf[:, m] = P(rank < m)
    lower = torch.minimum(rank[:, first], rank[:, second])  # (X, pairs)
    upper = torch.maximum(rank[:, first], rank[:, second])
    # P(min rank = lower and max rank = upper) over k draws from pi, by inclusion-exclusion.
    return (all_draws_in_ranks(cdf, lower, upper, k)
            - all_draws_in_ranks(cdf, lower + 1, upper, k)
            - all_draws_in_ranks(cdf, lower, upper - 1, k)
            + all_draws_in_ranks(cdf, lower + 1, upper - 1, k))

def fit_tabular(log_ref, targets, beta, weights_fn=None, rounds=3, loss_fn=irepo_loss):
    """Minimize sum_pairs w * loss_fn over a table of logits from pi_ref (L-BFGS, float64);
    targets (X, pairs); weights_fn(log_pi), the pair weights w, is re-evaluated each round."""
    first, second = pair_indices(log_ref.shape[-1])
    logits = log_ref.clone().requires_grad_(True)
    for _ in range(rounds):
        weights = weights_fn(torch.log_softmax(logits, -1).detach()) if weights_fn else 1.0
        optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12,
                                      tolerance_change=1e-16, history_size=50,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logratio = torch.log_softmax(logits, -1) - log_ref  # (X, Y)
            losses = weights * loss_fn(logratio[:, first], logratio[:, second], targets, beta)
            loss = losses.sum() / (weights.sum() if weights_fn else losses.numel())
            loss.backward()
            return loss
        optimizer.step(closure)
    return torch.log_softmax(logits, -1).detach()

def exact_targets(rewards):
    """logit P(i > j) = reward_i - reward_j per pair i < j, (X, pairs), through preference_logit."""
    first, second = pair_indices(rewards.shape[-1])
    return preference_logit(torch.sigmoid(rewards[:, first] - rewards[:, second]))

def theory_optimality(betas=(0.1, 0.5, 1.0), schemes=("uniform", "on-policy", "best-worst"),
                      loss_fn=irepo_loss):
    """Claim 1: with exact preferences the minimizer is pi*. Returns {(beta, scheme): error}."""
    log_ref, rewards = tabular_world(0)
    errors = {}
    for beta in betas:
        for scheme in schemes:
            weights_fn = functools.partial(pair_weights, scheme, rewards=rewards)  # of log pi
            log_pi = fit_tabular(log_ref, exact_targets(rewards), beta, weights_fn, loss_fn=loss_fn)
            error = (log_pi - optimal_policy(log_ref, rewards, beta)).abs().max()
            errors[beta, scheme] = float(error)
    return errors

def theory_annotators(ns=(1, 4, 16, 64, 256), seeds=20, beta=1.0, smoothing=0.5):
    """Claim 2: with N annotators per pair (votes ~ Binomial(N, P)), J(pi*) - J(pi_N) =
    beta KL(pi_N || pi*) falls as N grows. Returns {N: (mean, stderr)}, a world per seed."""
    suboptimality = {n: [] for n in ns}
    for seed in range(seeds):
        log_ref, rewards = tabular_world(1000 + seed)
        preferences = torch.sigmoid(exact_targets(rewards))  # P(i > j), (X, pairs)
        generator = torch.Generator().manual_seed(seed)
        log_optimal = optimal_policy(log_ref, rewards, beta)
        for n in ns:
            trials = torch.full_like(preferences, float(n))
            votes = torch.binomial(trials, preferences, generator=generator)
            targets = vote_share_logit(votes, n, smoothing)
            log_pi = fit_tabular(log_ref, targets, beta, rounds=1)
            suboptimality[n].append(float((beta * kl(log_pi, log_optimal)).mean()))
    return {n: (float(torch.tensor(per_world).mean()),
                float(torch.tensor(per_world).std()) / seeds ** 0.5)  # (mean, stderr)
            for n, per_world in suboptimality.items()}

def theory_iterations(ts=(1, 2, 3), beta=1.0):
    """Claim 3: T exact iterations with reference pi_t reach pi_0 exp(T r / beta) / Z.
    Returns {T: max |log pi_T - log pi*_{beta/T}|}."""
    log_ref, rewards = tabular_world(0)
    errors = {}
    log_pi = log_ref
    for t in range(1, max(ts) + 1):
        log_pi = fit_tabular(log_pi, exact_targets(rewards), beta)  # pi_t is the next reference
        if t in ts:
            errors[t] = float((log_pi - optimal_policy(log_ref, rewards, beta / t)).abs().max())
    return errors

def theory_hard_labels(steps=4000, every=1000, beta=0.1, lr=1.0, prompts=8):
    """Claim 4: one pair (0, 1) of 4 responses per prompt, one Bradley-Terry vote on it (iREPO's
    p_hat: 0.75 for its winner, target logit +-log 3); gradient descent on DPO, iREPO from pi_ref.
    Returns rows (step, DPO gap, iREPO gap, DPO's mean pi(y_l)); gap: log-ratio winner - loser."""
    log_ref, rewards = tabular_world(0, prompts=prompts, responses=4)
    generator = torch.Generator().manual_seed(0)
    win_chance = torch.sigmoid(rewards[:, 0] - rewards[:, 1])  # P(response 0 beats 1)
    vote = torch.bernoulli(win_chance, generator=generator)  # the single vote: 1 if 0 won
    target = vote_share_logit(vote, 1, 0.5)  # +-log 3
    sign = torch.where(target >= 0, 1.0, -1.0).double()  # +1 where response 0 won the vote
    logits_by_loss = {name: log_ref.clone().requires_grad_(True) for name in ("dpo", "irepo")}
    rows = []
    for step in range(steps + 1):
        gaps = {}
        for name, policy_logits in logits_by_loss.items():
            logratio = torch.log_softmax(policy_logits, -1) - log_ref
            gaps[name] = float((sign * (logratio[:, 0] - logratio[:, 1])).mean().detach())
            loss = LOSSES[name](logratio[:, 0], logratio[:, 1], target, beta).mean()
            gradient = torch.autograd.grad(loss, policy_logits)[0]
            with torch.no_grad():
                policy_logits -= lr * gradient * prompts  # per-prompt step size lr
        if step % every == 0:
            log_pi = torch.log_softmax(logits_by_loss["dpo"].detach(), -1)
            log_loser = torch.where(sign > 0, log_pi[:, 1], log_pi[:, 0])
            rows.append((step, gaps["dpo"], gaps["irepo"], float(log_loser.exp().mean())))
    return rows

def log_log_slope(gaps):
    """The least-squares slope of log mean suboptimality against log N (theory_annotators')."""
    log_n = torch.tensor(list(gaps), dtype=torch.float64).log()
    log_mean = torch.tensor([mean for mean, _ in gaps.values()], dtype=torch.float64).log()
    centred_n = log_n - log_n.mean()
    return float((centred_n * (log_mean - log_mean.mean())).sum() / (centred_n ** 2).sum())

def label_errors(rewards, n_annotators, smoothing, generator):
    """Votes of n_annotators Bradley-Terry annotators on every pair of K responses per prompt,
    ranked and labelled as the loop does. Returns each label's logit error against the chosen
    pair's true reward difference, (prompts,), and whether all K scores tie."""
    prompts, K = rewards.shape
    first, second = torch.triu_indices(K, K, 1)
    preference = torch.sigmoid(rewards[:, first] - rewards[:, second])
    votes = torch.binomial(torch.full_like(preference, float(n_annotators)), preference,
                           generator=generator)
    wins = torch.zeros(prompts, K, K)
    wins[:, first, second] = votes
    wins[:, second, first] = n_annotators - votes
    scores, best, worst = rank_responses(wins, smoothing)
    rows = torch.arange(prompts)
    truth = rewards[rows, best] - rewards[rows, worst]
    fresh = torch.binomial(torch.full_like(truth, float(n_annotators)), torch.sigmoid(truth),
                           generator=generator)
    own_votes = wins[rows, best, worst]
    errors = {
        "votes": vote_share_logit(own_votes, n_annotators, smoothing),
        "zermelo": scores[rows, best] - scores[rows, worst],
        "fresh": vote_share_logit(fresh, n_annotators, smoothing)}
    errors = {label: logit - truth for label, logit in errors.items()}
    return errors, (scores.max(-1).values - scores.min(-1).values) < 1e-6

def theory_labels(ks=(2, 4, 8), ns=(2, 8, 32), prompts=4000, smoothing=0.5):
    """Claim 5: bias and rmse of each label's logit against the chosen pair's true reward
    difference, in a null world (all rewards equal) and a Bradley-Terry one (rewards ~ N(0, 1)).
    Returns {(world, K, N): ({label: (bias, rmse)}, share of prompts whose K scores all tie)}."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for world in ("null", "bradley-terry"):
        for K in ks:
            rewards = torch.randn(prompts, K, generator=generator)
            if world == "null":
                rewards = torch.zeros(prompts, K)
            for n_annotators in ns:
                errors, tied = label_errors(rewards, n_annotators, smoothing, generator)
                out[world, K, n_annotators] = (
                    {label: (float(error.mean()), float((error ** 2).mean().sqrt()))
                     for label, error in errors.items()}, float(tied.float().mean()))
    return out

def print_label_table():
    """Claim 5 as a table, with what follows from it."""
    print("\nClaim 5. The soft label of the chosen pair: error of its logit against the true reward"
          "\n  difference, bias / rmse over 4,000 prompts; 'tied': prompts whose K scores all tie")
    print(f"  {'world':>13} {'K':>2} {'N':>3} " + "".join(
        f"{label:>15}" for label in ("votes", "zermelo", "fresh")) + f"{'tied':>7}")
    for (world, K, n_annotators), (errors, tied) in theory_labels().items():
        cells = [f"{bias:+.2f} / {rmse:.2f}" for bias, rmse in errors.values()]
        print(f"  {world:>13} {K:>2} {n_annotators:>3} " + "".join(f"{cell:>15}" for cell in cells)
              + f"{tied:>7.2f}")
    print("  In the null world the labels that reuse the choosing votes invent a preference (bias\n"
          "  > 0); fresh votes do not. The README's 'Which soft label' says what follows.")

def theory_report():
    """Print one table per claim. Returns nothing; the tests assert the same functions."""
    start = time.time()
    schemes = ("uniform", "on-policy", "best-worst")
    print("Claim 1. Exact preferences: the minimizer of the iREPO loss is pi* = pi_ref exp(r/beta)"
          "/Z\n  max |log pi - log pi*| over 4 prompts x 6 responses")
    print(f"  {'beta':>6} " + " ".join(f"{scheme:>12}" for scheme in schemes))
    errors = theory_optimality(schemes=schemes)
    for beta in sorted({beta for beta, _ in errors}):
        print(f"  {beta:>6} " + " ".join(f"{errors[beta, scheme]:>12.1e}" for scheme in schemes))
    soft = theory_optimality(schemes=("uniform",), loss_fn=soft_dpo_loss)  # the same claim
    print("  DPO on soft labels (soft-dpo), uniform pairs: the same minimizer, max |log pi - log "
          "pi*|\n  " + ", ".join(f"{error:.1e} at beta {beta}"
                                 for (beta, _), error in soft.items()))
    print("\nClaim 2. N annotators per pair: suboptimality J(pi*) - J(pi_N) = beta KL(pi_N || pi*)"
          f"\n  beta = 1, uniform pairs, smoothing 0.5, mean over 20 worlds\n  {'N':>5} "
          f"{'beta*KL':>10} {'+-stderr':>10}")
    suboptimality = theory_annotators()
    for n, (mean, stderr) in suboptimality.items():
        print(f"  {n:>5} {mean:>10.5f} {stderr:>10.5f}")
    print(f"  log-log slope: {log_log_slope(suboptimality):.2f} (variance alone: -1)")
    print("\nClaim 3. T iterations with reference pi_t reach pi_0 exp(T r / beta) / Z (beta = 1)"
          f"\n  {'T':>3} {'max |log pi_T - log pi*_(beta/T)|':>36}")
    for t, error in theory_iterations().items():
        print(f"  {t:>3} {error:>36.1e}")
    print("\nClaim 4. One vote per pair: log-ratio gap (winner - loser) under gradient descent, "
          f"beta = 0.1\n  {'step':>6} {'DPO gap':>10} {'iREPO gap':>10} {'DPO pi(y_l)':>12}")
    for step, dpo_gap, irepo_gap, loser in theory_hard_labels():
        print(f"  {step:>6} {dpo_gap:>10.3f} {irepo_gap:>10.3f} {loser:>12.2e}")
    print_label_table()
    print(f"\n(theory checks took {time.time() - start:.1f}s)")

# --- The losses compared (python irepo.py --compare): the reward-KL frontier (README). Each curve
# (a loss and a label) runs over a grid of beta, chosen so that the KL ranges overlap, and seeds.
COMPARE_CURVES = {  # curve: (loss, label, betas)
    "irepo": ("irepo", "zermelo", (0.5, 2.0)),
    "irepo-fresh": ("irepo", "fresh", (0.5, 2.0)),
    "soft-dpo": ("soft-dpo", "zermelo", (0.5, 2.0)),
    "dpo": ("dpo", "zermelo", (1.0, 4.0)),
    "ipo": ("ipo", "zermelo", (0.1, 0.5))}
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")  # Okabe-Ito

def interpolate(points, level):
    """The reward at KL `level` on the line through points (kl, reward) in order of KL, or None."""
    points = sorted(points)
    for (kl_0, reward_0), (kl_1, reward_1) in zip(points, points[1:]):
        if kl_0 <= level <= kl_1:
            if kl_1 == kl_0:
                return reward_0
            return reward_0 + (reward_1 - reward_0) * (level - kl_0) / (kl_1 - kl_0)
    return None

def points_by_seed(rows):
    """{(curve, seed): [(kl_to_initial, true_reward) of each of its rows, over every beta]}."""
    points = {}
    for row in rows:
        point = (row["kl_to_initial"], row["true_reward"])
        points.setdefault((row["curve"], row["seed"]), []).append(point)
    return points

def frontier_line(points):
    """A seed's frontier, as the table reads and the picture draws it: its points (kl, reward) that
    beat the reward of every point with less KL, in order of KL, then flat to its largest KL."""
    frontier = []
    for kl_to_initial, true_reward in sorted(points):
        if not frontier or true_reward > frontier[-1][1]:
            frontier.append((kl_to_initial, true_reward))
    return frontier + [(max(points)[0], frontier[-1][1])]

def matched_rewards(rows, levels):
    """{curve: {level: [reward per seed]}}: each seed's frontier_line interpolated at each level."""
    table = {}
    for (curve, seed), points in sorted(points_by_seed(rows).items()):
        for level in levels:
            reward = interpolate(frontier_line(points), level)
            if reward is not None:
                table.setdefault(curve, {}).setdefault(level, []).append(reward)
    return table

def verdict(table, level):
    """'first > second' for each ordered pair of curves where every seed of first beats every
    seed of second at this level; else 'within noise' (README: 'The losses compared')."""
    rewards_by_curve = {curve: by_level[level] for curve, by_level in table.items()
                        if len(by_level.get(level, [])) >= 2}  # the curves with 2 seeds or more
    wins = []
    for first in rewards_by_curve:
        for second in rewards_by_curve:
            if first != second and min(rewards_by_curve[first]) > max(rewards_by_curve[second]):
                wins.append(f"{first} > {second}")
    return ", ".join(wins) or "within noise"

def matched_levels(rows, count=5):
    """`count` KL levels spread evenly over the interval that every (curve, seed) covers, from the
    largest of their smallest KLs to the smallest of their largest; none if there is none."""
    kls_by_seed = [[kl_to_initial for kl_to_initial, _ in points]
                   for points in points_by_seed(rows).values()]
    low, high = max(min(kls) for kls in kls_by_seed), min(max(kls) for kls in kls_by_seed)
    if not high > low:
        return []
    # the last level is `high` itself: low + (high - low) can round one ulp above it
    return [low + (high - low) * i / (count - 1) for i in range(count - 1)] + [high]

def mean_and_std(rewards):
    """(mean, std) of the seeds' rewards; std 0 for one seed."""
    values = torch.tensor(rewards, dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0

def print_table(table, levels, curves, seeds):
    """The matched-KL table, a verdict per level, and how much the verdicts are worth."""
    print(f"{'KL':>6} " + "".join(f"{curve:>16}" for curve in curves) + "   verdict")
    for level in levels:
        cells = []
        for curve in curves:
            rewards = table.get(curve, {}).get(level, [float("nan")])
            mean, std = mean_and_std(rewards)
            cells.append(f"{mean:.2f}" + (f" +- {std:.2f}" if len(rewards) > 1 else ""))
        print(f"{level:>6.2f} " + "".join(f"{cell:>16}" for cell in cells), "  ",
              verdict(table, level))
    # every seed of every curve reaches every level; a verdict needs 2 seeds a side
    comparisons = len(levels) * len(curves) * (len(curves) - 1) if seeds > 1 else 0
    # 1/splits: a false verdict's chance for independent runs; the curves share seeds and prompts
    splits = math.comb(2 * seeds, seeds)
    print(f"{comparisons} comparisons (ordered pairs of curves x KL levels), each false with "
          f"chance about 1/{splits} if the two curves were the same; were all the same, chance "
          f"alone would give about {comparisons / splits:.1f} verdicts on average: a hint only")

# The picture, frontier.svg: standard-library SVG, each mark with data-* attributes of its data.
LEFT, RIGHT, TOP, BOTTOM = 70, 560, 60, 420  # the plot's edges, in pixels

def element(tag, text="", **attributes):
    """One SVG element, a line of text; underscores in attribute names become dashes."""
    written = "".join(f" {name.replace('_', '-')}={quoteattr(str(value))}"
                      for name, value in attributes.items())
    return f"<{tag}{written}>{escape(str(text))}</{tag}>\n"

def axis(low, high, start, end):
    """About 5 round ticks (1, 2 or 5 times a power of 10 apart) from <= low to >= high, and the
    pixel of a value, with the first tick at pixel start and the last at end."""
    rough = (high - low) / 5 or 1.0
    power = 10 ** math.floor(math.log10(rough))
    step = next(power * multiple for multiple in (1, 2, 5, 10) if power * multiple >= rough)
    first = math.floor(low / step)
    last = max(math.ceil(high / step), first + 1)  # two ticks at least, when low == high too
    ticks = [round(i * step, 12) for i in range(first, last + 1)]

    def pixel(value):
        return round(start + (end - start) * (value - ticks[0]) / (ticks[-1] - ticks[0]), 2)
    return ticks, pixel

def frontier_svg(rows, table, curves, title):
    """frontier.svg: true reward against KL; each (curve, seed)'s frontier_line, thin; each curve's
    mean +- 1 std over seeds at the matched KL levels, side by side; tick labels; a legend."""
    lines = {key: frontier_line(points) for key, points in points_by_seed(rows).items()}
    bars = {(curve, level): mean_and_std(rewards)
            for curve, by_level in table.items() for level, rewards in by_level.items()}
    rewards = [reward for line in lines.values() for _, reward in line] + [
        mean + sign * std for mean, std in bars.values() for sign in (-1, 1)]
    kls = [kl for line in lines.values() for kl, _ in line]  # an estimate can be below 0
    kl_ticks, kl_pixel = axis(min(0, min(kls)), max(kls), LEFT, RIGHT)
    reward_ticks, reward_pixel = axis(min(rewards), max(rewards), BOTTOM, TOP)
    parts = [element("rect", width="100%", height="100%", fill="white"),
             element("rect", x=LEFT, y=TOP, width=RIGHT - LEFT, height=BOTTOM - TOP, fill="none",
                     stroke="#999"),  # the frame: its edges are the first and last ticks
             element("text", title, x=10, y=20, font_size=13, text_anchor="start"),
             element("text", "thin lines: each seed's frontier over every beta; dots and bars: "
                     "mean +- 1 std at the table's KL levels", x=10, y=38, text_anchor="start"),
             element("text", "KL(pi_0 || pi_t), nats", x=(LEFT + RIGHT) / 2, y=BOTTOM + 40),
             element("text", "true reward (simulated panel's hidden reward)", x=0, y=0,
                     transform=f"translate(18 {(TOP + BOTTOM) / 2}) rotate(-90)")]
    for kl in kl_ticks:  # tick labels; data-tick-*: the value of each
        parts.append(element("text", f"{kl:g}", x=kl_pixel(kl), y=BOTTOM + 18, data_tick_kl=kl))
    for reward in reward_ticks:
        parts.append(element("text", f"{reward:g}", x=LEFT - 16, y=reward_pixel(reward),
                             dominant_baseline="middle", data_tick_reward=reward))
    colours = {curve: COLOURS[index % len(COLOURS)] for index, curve in enumerate(curves)}
    for index, (curve, (loss, label, betas)) in enumerate(curves.items()):
        legend = f"{curve}: {loss}, {label} label, beta {', '.join(map(str, betas))}"
        parts.append(element("text", legend, x=RIGHT + 20, y=TOP + 20 * index, fill=colours[curve],
                             text_anchor="start", data_curve=curve))
    for (curve, seed), line in lines.items():
        points = " ".join(f"{kl_pixel(kl)},{reward_pixel(reward)}" for kl, reward in line)
        parts.append(element("polyline", points=points, fill="none", stroke=colours[curve],
                             stroke_opacity=0.5, data_curve=curve, data_seed=seed))
    for (curve, level), (mean, std) in bars.items():
        middle = kl_pixel(level) + 5 * (list(curves).index(curve) - (len(curves) - 1) / 2)
        parts += [element("line", x1=middle, x2=middle, y1=reward_pixel(mean - std),
                          y2=reward_pixel(mean + std), stroke=colours[curve], stroke_width=2),
                  element("circle", cx=middle, cy=reward_pixel(mean), r=3.5, fill=colours[curve],
                          data_curve=curve, data_kl=level, data_reward=mean, data_std=std)]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="900" height="470" '
            'font-family="sans-serif" font-size="12" text-anchor="middle">\n'
            + "".join(parts) + "</svg>\n")

def compare_losses(args, grid=COMPARE_CURVES, seeds=3):
    """Every curve over its betas and `seeds` seeds, from one shared warm-up: frontier.jsonl, the
    table at KL levels inside every curve's and seed's range (no extrapolation), frontier.svg."""
    import argparse
    metric_names = ("iteration", "kl_to_initial", "true_reward", "win_rate_vs_initial")
    rows = []
    for curve, (loss, label, betas) in grid.items():
        for beta in betas:
            for seed in range(args.seed, args.seed + seeds):
                run_dir = os.path.join(args.out, "compare", f"{curve}_beta{beta}_seed{seed}")
                run_args = argparse.Namespace(**vars(args) | dict(
                    loss=loss, label=label, beta=beta, seed=seed, out=run_dir, overwrite=True,
                    resume=False))
                print(f"\n=== {curve}: --loss {loss} --label {label} --beta {beta} --seed {seed}")
                for metrics in run(run_args):
                    rows.append(dict(curve=curve, loss=loss, label=label, beta=beta, seed=seed)
                                | {name: metrics[name] for name in metric_names})
    on_main(write_atomic, os.path.join(args.out, "frontier.jsonl"), "".join(map(jsonl_line, rows)))
    levels = matched_levels(rows)
    table = matched_rewards(rows, levels)
    print(f"\nTrue reward at matched KL(pi_0 || pi_t), mean +- std over {seeds} seeds "
          f"(every point in {args.out}/frontier.jsonl, the picture in frontier.svg):")
    print_table(table, levels, grid, seeds)
    title = (f"Reward-KL frontier, --model {args.model}: {args.iterations} iterations x "
             f"{args.prompts_per_iteration} prompts, K = {args.num_responses}, N = "
             f"{args.num_annotators}, seeds {args.seed} to {args.seed + seeds - 1}")
    on_main(write_atomic, os.path.join(args.out, "frontier.svg"),
            frontier_svg(rows, table, grid, title))
    return rows

if __name__ == "__main__":
    main()
    if dist.is_initialized():  # leave together and at once: tearing gloo down can abort the exit
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
