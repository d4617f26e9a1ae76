"""Tests for irepo.py: CPU only, offline, a few minutes in all.

Each test's docstring states the invariant it checks. Statistical tests fix their seeds and say
why a failure cannot be chance.
"""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

# However the suite is launched, it runs on the CPU in one process (the numbers below are fp32
# CPU numbers): a GPU, if any, is hidden from it and its children, and torchrun's variables from
# a surrounding job are dropped before irepo reads them (the many-process tests start their own).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the network: the hub reads its cache only
for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT"):
    os.environ.pop(name, None)

import pytest
import torch

import irepo

HERE = os.path.dirname(os.path.abspath(__file__))


def default_signals():
    """Run in each child before it starts: SIGINT and SIGTERM at their default disposition. A
    shell starts a background job (`pytest ... &`) with SIGINT ignored, an ignored signal stays
    ignored in the children, and Python then installs no KeyboardInterrupt handler."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


def child(command, timeout=300, popen=False, **env):
    """Start a child process the same way however the suite was launched: offline, its signals
    at their defaults, stdin empty (a background job that reads the terminal is stopped), its
    output captured as text; `env` adds or replaces variables. Waits up to `timeout` seconds,
    or, with popen, returns the running process."""
    options = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True, preexec_fn=default_signals,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env})
    if popen:
        return subprocess.Popen(command, **options)
    return subprocess.run(command, timeout=timeout, **options)


# ---------------------------------------------------------------------------------------------
# Shared fixtures: tiny random-weight models of real architectures, built offline.
# ---------------------------------------------------------------------------------------------

def word_tokenizer(words):
    """A word-level tokenizer from the `tokenizers` package, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_causal_lm(kind, vocab_size, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32,
                                          n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def warm_tiny(tmp_path_factory):
    """The built-in tiny policy after its warm-up, built once for the module."""
    folder = tmp_path_factory.mktemp("tiny") / "warmup"
    irepo.build_tiny(str(folder), seed=0, steps=300)
    return str(folder)


def small_run_args(out, *extra):
    return ["--out", str(out), "--iterations", "2", "--prompts-per-iteration", "24",
            "--eval-prompts", "16", "--eval-samples", "1", "--epochs", "2", *extra]


def run_with_warmup(warm_tiny, out, *extra):
    """Run irepo.main in-process, reusing the module's warm-up (as a rerun in --out would)."""
    os.makedirs(out, exist_ok=True)
    shutil.copytree(warm_tiny, os.path.join(out, "warmup"), dirs_exist_ok=True)
    irepo.main(small_run_args(out, *extra))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# The loss and the soft labels.
# ---------------------------------------------------------------------------------------------

def test_irepo_loss_hand_computed():
    """(beta*(la - lb) - target)^2, per pair, e.g. (0.5*(2 - (-1)) - 1)^2 = 0.25."""
    la = torch.tensor([2.0, 0.0, -1.0])
    lb = torch.tensor([-1.0, 0.0, 3.0])
    target = torch.tensor([1.0, 0.5, -2.0])
    got = irepo.irepo_loss(la, lb, target, beta=0.5)
    # 0.5*3 - 1 = 0.5 -> 0.25;  0 - 0.5 -> 0.25;  0.5*(-4) + 2 = 0 -> 0
    assert torch.allclose(got, torch.tensor([0.25, 0.25, 0.0]))
    assert got.shape == (3,)


def test_irepo_loss_symmetry():
    """Swapping a and b negates the implicit reward difference; with the target negated too
    (logit(1 - p) = -logit p) the loss is unchanged."""
    g = torch.Generator().manual_seed(0)
    la, lb, p = torch.randn(50, generator=g), torch.randn(50, generator=g), torch.rand(50, generator=g)
    target = irepo.preference_logit(p)
    swapped_target = irepo.preference_logit(1 - p)
    assert torch.allclose(swapped_target, -target, atol=1e-5)
    for beta in (0.01, 0.1, 1.0):
        assert torch.allclose(irepo.irepo_loss(la, lb, target, beta),
                              irepo.irepo_loss(lb, la, swapped_target, beta), atol=1e-5)


def test_baseline_losses_hand_computed():
    """DPO is -log sigma(beta*h) towards the majority winner; IPO is (beta*h - 1/2)^2 towards it,
    i.e. IPO's (h - 1/(2 beta))^2 times beta^2."""
    la, lb = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    target = torch.tensor([0.7, -0.7])  # a wins the first pair, b the second
    dpo = irepo.dpo_loss(la, lb, target, beta=2.0)
    assert torch.allclose(dpo, torch.tensor([math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))]))
    ipo = irepo.ipo_loss(la, lb, target, beta=2.0)
    assert torch.allclose(ipo, torch.tensor([(2.0 - 0.5) ** 2, (-2.0 - 0.5) ** 2]))
    assert torch.allclose(ipo, 4.0 * (torch.tensor([1.0, -1.0]) - 1 / (2 * 2.0)) ** 2)


def test_smoothing_keeps_logits_finite():
    """Unanimous panels (0 or N votes for a) give finite, opposite logits; with smoothing 0.5,
    p_hat = (v + 0.5) / (N + 1), so 0 of 4 votes gives logit(0.1) and 4 of 4 logit(0.9). The
    logit stays finite where p_hat itself rounds to 1: N = 1e9 unanimous votes, smoothing 1e-6
    (logit log(1e15), 34.5)."""
    for n in (1, 4, 64):
        logit = irepo.vote_share_logit(torch.tensor([0.0, float(n)]), n, smoothing=0.5)
        assert torch.isfinite(logit).all()
        assert logit[0] == pytest.approx(-logit[1].item())
    logits = irepo.vote_share_logit(torch.tensor([0.0, 4.0, 2.0]), 4, 0.5)
    assert torch.allclose(logits, torch.tensor([-math.log(9.0), math.log(9.0), 0.0]))
    assert irepo.preference_logit(torch.tensor(0.9)).item() == pytest.approx(math.log(9.0), rel=1e-5)
    unanimous = torch.tensor(1e9, dtype=torch.float64)
    assert float(irepo.vote_share_logit(unanimous, 1e9, 1e-6)) == pytest.approx(math.log(1e15))


def reference_scores(wins, smoothing):
    """An independent fit of the same likelihood: L-BFGS on the negative log-likelihood of
    Bradley-Terry with `smoothing` pseudo-votes per ordered pair, float64, centred to mean 0."""
    votes = (wins.double() + smoothing) * (1 - torch.eye(wins.shape[-1], dtype=torch.float64))
    scores = torch.zeros(wins.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([scores], max_iter=1000, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -(votes * torch.nn.functional.logsigmoid(scores[:, None] - scores[None, :])).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return (scores - scores.mean()).detach()


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_zermelo_scores_are_the_maximum_likelihood_fit(k):
    """zermelo_scores equals an independent L-BFGS fit of the same likelihood to 1e-6, for N up to
    1000 and smoothing down to 0.01, on random, unanimous and one-sided panels (where the scores
    spread over 30 nats and more); the label s_best - s_worst is finite. Deterministic: seeded
    panels, and two exact optimizers of one strictly concave likelihood agree or one is wrong."""
    generator = torch.Generator().manual_seed(k)
    first, second = torch.triu_indices(k, k, 1)
    for n in (1, 42, 1000):
        strengths = 3 * torch.randn(k, generator=generator)
        chance = torch.sigmoid(strengths[first] - strengths[second])
        panels = {"random": torch.binomial(torch.full_like(chance, n), chance, generator=generator),
                  "unanimous": torch.full_like(chance, n),  # response i beats every j > i
                  "one-sided": torch.where(chance > 0.5, float(n), 0.0)}
        for votes in panels.values():
            wins = torch.zeros(k, k)
            wins[first, second], wins[second, first] = votes, n - votes
            for smoothing in (0.01, 0.1, 0.5):
                scores = irepo.zermelo_scores(wins, smoothing)
                assert torch.isfinite(scores).all() and abs(float(scores.sum())) < 1e-9
                assert (scores - reference_scores(wins, smoothing)).abs().max() < 1e-6, (n, smoothing)
    batched = torch.stack([wins, wins.T])  # the batch dimensions fit each panel on its own
    assert torch.allclose(irepo.zermelo_scores(batched, 0.5)[1], irepo.zermelo_scores(wins.T, 0.5))


# ---------------------------------------------------------------------------------------------
# Zermelo ranking and the annotation step.
# ---------------------------------------------------------------------------------------------

def test_zermelo_recovers_bradley_terry_strengths():
    """With 2000 simulated comparisons per pair from known log-strengths, the fitted
    log-strengths match them within 0.1. Seeded; the standard error of each fitted score here
    is about 0.03, so a 0.1 miss would be a >3-sigma event on every retry of the seed."""
    g = torch.Generator().manual_seed(1)
    true = torch.tensor([-1.0, -0.3, 0.0, 0.4, 0.9])
    true = true - true.mean()
    k, n = len(true), 2000
    wins = torch.zeros(k, k)
    for i in range(k):
        for j in range(i + 1, k):
            w = torch.bernoulli(torch.full((n,), float(torch.sigmoid(true[i] - true[j]))), generator=g).sum()
            wins[i, j], wins[j, i] = w, n - w
    fitted = irepo.zermelo_scores(wins, 0.5)
    assert (fitted - true).abs().max() < 0.1
    # Batched input gives the same scores row by row.
    both = irepo.zermelo_scores(torch.stack([wins, wins.T]), 0.5)
    assert torch.allclose(both[0], fitted, atol=1e-4)
    assert torch.allclose(both[1], irepo.zermelo_scores(wins.T, 0.5), atol=1e-4)


def test_zermelo_undefeated_is_finite_and_first():
    """A response that wins every vote gets a finite, top score thanks to the smoothing."""
    wins = torch.tensor([[0.0, 3.0, 3.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    s = irepo.zermelo_scores(wins, 0.5)
    assert torch.isfinite(s).all()
    assert s.argmax() == 0 and s.argmin() == 2


class FixedPanel:
    """A deterministic panel: votes for a = round(N * sigma(r(a) - r(b))) annotators, where r is
    looked up in a table of rewards by response text."""

    def __init__(self, n, rewards):
        self.n, self.rewards = n, rewards

    def compare(self, prompts, texts_a, texts_b, group=1):
        out = []
        for a, b in zip(texts_a, texts_b):
            k = round(self.n * 1 / (1 + math.exp(self.rewards[b] - self.rewards[a])))
            out.append([1.0] * k + [0.0] * (self.n - k))
        return torch.tensor(out)


def test_annotate_keeps_zermelo_best_and_worst():
    """annotate() keeps, for each prompt, the responses with the highest and lowest Zermelo
    scores of the panel's votes (0.5 pseudo-votes per ordered pair); with --label votes it
    labels the pair with the panel's votes on that pair, with --label zermelo with the fit's
    sigma(s_best - s_worst)."""
    rewards = {"w": 0.0, "x": 2.0, "y": -1.5, "z": 0.5}
    panel = FixedPanel(10, rewards)
    texts = ["w", "x", "y", "z", "z", "y", "x", "w"]  # two prompts, k = 4 each
    labels = irepo.annotate(panel, ["p", "q"], texts, 4, 0.5, "votes")
    fitted = irepo.annotate(panel, ["p", "q"], texts, 4, 0.5, "zermelo")
    for q, lab in enumerate(labels):
        group = texts[4 * q:4 * q + 4]
        wins = torch.zeros(4, 4)
        for i in range(4):
            for j in range(4):
                if i != j:
                    wins[i, j] = panel.compare(["p"], [group[i]], [group[j]]).sum()
        scores = irepo.zermelo_scores(wins, 0.5)
        assert lab["best"] == int(scores.argmax()) and group[lab["best"]] == "x"
        assert lab["worst"] == int(scores.argmin()) and group[lab["worst"]] == "y"
        votes = wins[lab["best"], lab["worst"]].item()  # round(10 * sigma(3.5)) = 10
        assert lab["votes_a"] == votes == 10
        assert lab["p_hat"] == pytest.approx((votes + 0.5) / 11)
        assert lab["target_logit"] == pytest.approx(math.log(10.5 / 0.5), rel=1e-5)
        gap = float(scores[lab["best"]] - scores[lab["worst"]])
        assert (fitted[q]["best"], fitted[q]["worst"]) == (lab["best"], lab["worst"])
        assert fitted[q]["target_logit"] == pytest.approx(gap, abs=1e-5)
        assert fitted[q]["label"] == "zermelo" and lab["label"] == "votes"


# ---------------------------------------------------------------------------------------------
# Log-probabilities.
# ---------------------------------------------------------------------------------------------

def one_at_a_time(model, prompt, response):
    """The naive reference: one unpadded sequence, a full log-softmax, summed by a loop."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    return sum(logp[len(prompt) + i - 1, tok].item() for i, tok in enumerate(response))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sequence_logprobs_matches_one_at_a_time(kind):
    """Batched, left-padded, prompt-masked log-probs equal the sum of per-token log-probs of
    each sequence scored alone, for rows of different prompt and response lengths."""
    model = tiny_causal_lm(kind, vocab_size=40)
    g = torch.Generator().manual_seed(0)
    lengths = [(3, 5), (7, 1), (1, 6), (5, 3)]  # (prompt, response) lengths
    prompts = [torch.randint(3, 40, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(3, 40, (r,), generator=g).tolist() for _, r in lengths]
    ids, attn, resp = irepo.collate(prompts, responses, pad_id=0, device="cpu")
    assert ids.shape == (4, 7 + 6)  # trimmed to the longest prompt + longest response
    with torch.no_grad():
        got = irepo.sequence_logprobs(model, ids, attn, resp)
    want = torch.tensor([one_at_a_time(model, p, r) for p, r in zip(prompts, responses)], dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_sequence_logprobs_gradient_flows():
    """The training path differentiates through sequence_logprobs to every weight used."""
    model = tiny_causal_lm("gpt2", vocab_size=40)
    ids, attn, resp = irepo.collate([[5, 6], [7]], [[8, 9, 1], [10]], pad_id=0, device="cpu")
    irepo.sequence_logprobs(model, ids, attn, resp).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Prompts and bad input.
# ---------------------------------------------------------------------------------------------

def test_prompt_chunks_are_disjoint():
    """Held-out prompts and the iteration chunks never share an entry."""
    args = irepo.parse_args(["--iterations", "3", "--prompts-per-iteration", "100"])
    held_out, chunks = irepo.split_prompts(irepo.tiny_prompts(), args)
    assert len(held_out) == 64 and [len(c) for c in chunks] == [100, 100, 100]
    seen = set(held_out)
    for c in chunks:
        assert not seen & set(c)
        seen |= set(c)


def test_read_prompts_txt_and_jsonl(tmp_path):
    """.txt: one prompt per non-empty line; .jsonl: the 'prompt' field."""
    (tmp_path / "p.txt").write_text("first one\n\n  second  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 2}\n')
    assert irepo.read_prompts(str(tmp_path / "p.txt")) == ["first one", "second"]
    assert irepo.read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]


UF_ROWS = {  # a stand-in for UltraFeedback: a few instructions per file, with repeats
    "evol_instruct.jsonl": ["review the hotel", "describe the food", "review the hotel"],
    "false_qa.jsonl": ["describe the park", "  describe the food  "],
    "flan.jsonl": ["write about the song", ""],  # an empty instruction is left out
    "sharegpt.jsonl": ["tell me about the city", "review the game"],
    "truthful_qa.jsonl": ["describe the beach"],
    "ultrachat.jsonl": ["write about the trip", "review the hotel", "describe the car"],
}
UF_DISTINCT = ["review the hotel", "describe the food", "describe the park", "write about the song",
               "tell me about the city", "review the game", "describe the beach",
               "write about the trip", "describe the car"]


def write_hub_files(cache, rows_by_file):
    """openbmb/UltraFeedback's files in a hub cache folder, laid out as hf_hub_download leaves
    them (refs/main names a commit whose snapshot holds the files); returns their paths."""
    commit = "0" * 40
    repo = cache / "datasets--openbmb--UltraFeedback"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for name, instructions in rows_by_file.items():
        rows = [{"source": name.split(".")[0], "instruction": text, "completions": []}
                for text in instructions]
        (repo / "snapshots" / commit / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {name: str(repo / "snapshots" / commit / name) for name in rows_by_file}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache of the test's own, offline, here and in the subprocesses it starts."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_ultrafeedback_prompts_are_downloaded_once(offline_hub, monkeypatch):
    """Without --prompts a real model gets UltraFeedback's instructions: read from every file,
    duplicates removed, in file order, then ordered by --seed as any prompts are. The first start
    downloads each file (here a fake download into the hub's cache); a second start downloads
    nothing: the hub's own hf_hub_download finds them in its cache, offline."""
    import huggingface_hub
    downloads = []

    def download(repo_id, filename, repo_type):  # what a download leaves in the cache
        downloads.append((repo_id, filename, repo_type))
        return write_hub_files(offline_hub, {filename: UF_ROWS[filename]})[filename]
    real_download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    args = irepo.parse_args(["--model", "microsoft/phi-2", "--eval-prompts", "3", "--iterations", "2"])
    assert irepo.load_prompts(args)[0] == UF_DISTINCT
    assert downloads == [("openbmb/UltraFeedback", name, "dataset") for name in UF_ROWS]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", real_download)
    prompts, source = irepo.load_prompts(args)  # the second start: offline, from the cache
    assert prompts == UF_DISTINCT and len(downloads) == 6
    assert source == "distinct instructions of UltraFeedback (openbmb/UltraFeedback)"
    first, again = irepo.split_prompts(prompts, args), irepo.split_prompts(prompts, args)
    other = irepo.split_prompts(prompts, irepo.parse_args(["--model", "microsoft/phi-2", "--eval-prompts",
                                                           "3", "--iterations", "2", "--seed", "1"]))
    assert first == again and first != other  # 9! orders: two seeds agree by chance 1 in 362,880
    assert sorted(first[0] + first[1][0] + first[1][1]) == sorted(UF_DISTINCT)


def test_prompts_file_and_templates_win_over_ultrafeedback(tmp_path, monkeypatch):
    """--prompts FILE and --prompts tiny (the template prompts, with any model) are used as given,
    and the tiny model keeps its templates: none of them asks the hub for UltraFeedback."""
    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: asked.append(args))
    (tmp_path / "p.txt").write_text("first\nsecond\n")
    for argv, expected in ((["--model", "microsoft/phi-2", "--prompts", str(tmp_path / "p.txt")],
                            ["first", "second"]),
                           (["--model", "microsoft/phi-2", "--prompts", "tiny"], irepo.tiny_prompts()),
                           ([], irepo.tiny_prompts())):
        assert irepo.load_prompts(irepo.parse_args(argv))[0] == expected
    assert asked == []


def test_ultrafeedback_offline_stops_before_any_work(offline_hub, tmp_path, monkeypatch):
    """Offline, with UltraFeedback not in the hub's cache, a real model without --prompts stops
    with one line naming the file and the cause, --prompts FILE and the README's recipe, exit 2,
    before any model is loaded or --out is made; the same through the real command line."""
    def load_policy(*args):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(irepo, "load_policy", load_policy)
    message = ("the prompts: openbmb/UltraFeedback/evol_instruct.jsonl is not in the hub's cache and "
               "cannot be downloaded (OfflineModeIsEnabled: ")
    assert_main_stops(["--model", "microsoft/phi-2", "--out", str(tmp_path / "out")], message)
    proc = cli("--model", "microsoft/phi-2", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, message)
    assert "give --prompts FILE (the README's 'Prompts' shows how" in proc.stderr
    assert not (tmp_path / "out").exists()


BAD_INPUTS = [
    (["--beta", "0"], "--beta 0.0: must be > 0"),
    (["--beta", "-1"], "--beta -1.0: must be > 0"),
    (["--num-responses", "1"], "--num-responses 1: must be >= 2"),
    (["--num-annotators", "0"], "--num-annotators 0: must be >= 1"),
    (["--iterations", "0"], "--iterations 0: must be >= 1"),
    (["--beta", "nan"], "--beta nan: must be > 0"),
    (["--prompts", "/nonexistent/p.txt"], "--prompts /nonexistent/p.txt: cannot be read (No such file"),
    (["--loss", "kto"], "argument --loss: invalid choice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--annotators", "human"], "--annotators human: people are not asked at the terminal; collect their votes"),
    (["--annotators", "sim,human:3"], "--annotators sim,human:3: people are not asked"),
    (["--theory", "--compare"], "argument --compare: not allowed with argument --theory"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_flags_stop_with_one_line(argv, message, capsys, tmp_path):
    """Each bad flag stops with exit status 2 and one line naming the flag, before any work."""
    with pytest.raises(SystemExit) as stop:
        irepo.main(argv + ["--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_prompts_files_name_the_file_and_line(tmp_path, capsys):
    """An empty file and a malformed JSONL line stop the run; the message names file and line."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    missing_field = tmp_path / "field.jsonl"
    missing_field.write_text('{"text": "no prompt here"}\n')
    cases = [(empty, f"--prompts {empty}: the file holds no prompt"),
             (bad, f"{bad}:2: malformed JSON"),
             (missing_field, f"{missing_field}:1: field 'prompt' must be a non-empty string, got None")]
    for path, message in cases:
        with pytest.raises(SystemExit) as stop:
            irepo.main(["--prompts", str(path), "--out", str(tmp_path / "out")])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("irepo.py: error: " + message), err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    """The real command line: exit status 2, one line on stderr, no traceback."""
    proc = cli("--num-responses", "1", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "irepo.py: error: --num-responses 1: must be >= 2 (a pair needs two responses)"
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------------------------

METRIC_KEYS = {"iteration", "loss", "regression_mse", "sign_agreement", "win_rate_vs_initial",
               "true_reward", "kl_to_reference", "response_tokens_mean", "seconds_sample",
               "seconds_annotate", "seconds_reference", "seconds_train", "train_tokens_per_s",
               "peak_memory_mb", "label", "tied_pairs"}


def test_end_to_end_two_iterations(warm_tiny, tmp_path):
    """Two small iterations change the weights and write every output: a loadable model and
    tokenizer per iteration, its pairs, and one metrics row per iteration with every key."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out))
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        agreeing = r["sign_agreement"] * r["pairs"]  # a count of pairs
        votes = r["win_rate_vs_initial"] * 16 * 8  # 8 votes on each of 16 held-out prompts
        assert abs(agreeing - round(agreeing)) < 1e-6 and abs(votes - round(votes)) < 1e-6
    before = AutoModelForCausalLM.from_pretrained(out / "warmup").state_dict()
    for t in (1, 2):
        folder = out / f"iteration_{t}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
        changed = [n for n, w in model.state_dict().items() if not torch.equal(w, before[n])]
        assert changed, f"iteration {t} left every weight unchanged"
        pairs = [json.loads(line) for line in open(folder / "pairs.jsonl")]
        assert len(pairs) == rows[t - 1]["pairs"]
        for p in pairs:
            assert {"prompt", "response_a", "response_b", "votes_a", "p_hat", "target_logit"} <= set(p)
            assert p["response_a"] != p["response_b"]
            assert p["target_logit"] == pytest.approx(math.log(p["p_hat"] / (1 - p["p_hat"])), abs=1e-4)
    assert_pairs_come_from_their_chunks(out, 2)
    assert not list(out.glob("*.tmp"))  # nothing half-written left behind


def assert_pairs_come_from_their_chunks(out, iterations):
    """Each iteration's pairs are those of its own chunk of prompts, in the chunk's order, at
    most one per prompt: a pair from another chunk or order lost in gathering would show."""
    args = irepo.parse_args(small_run_args(out, "--iterations", str(iterations)))
    _, chunks = irepo.split_prompts(irepo.tiny_prompts(), args)
    for t in range(1, iterations + 1):
        prompts = [json.loads(line)["prompt"] for line in open(out / f"iteration_{t}" / "pairs.jsonl")]
        remaining = iter(chunks[t - 1])
        assert prompts and all(prompt in remaining for prompt in prompts)  # an ordered subsequence


def test_reference_is_pi_t(warm_tiny, tmp_path):
    """The cached reference log-probs of iteration t are those of pi_t (the model saved by the
    previous iteration, or the warm-up for t = 1), not of the model being trained: recomputed
    under pi_t they match to 1e-4, and under pi_{t+1} they do not."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    run_with_warmup(warm_tiny, str(out))
    models = [AutoModelForCausalLM.from_pretrained(out / name).eval()
              for name in ("warmup", "iteration_1", "iteration_2")]
    for t in (1, 2):
        pairs = [json.loads(line) for line in open(out / f"iteration_{t}" / "pairs.jsonl")]
        prompt_ids = [p["prompt_ids"] for p in pairs]
        saved = torch.tensor([p["logp_ref_a"] for p in pairs] + [p["logp_ref_b"] for p in pairs])
        responses = [p["a_ids"] for p in pairs] + [p["b_ids"] for p in pairs]
        under = lambda m: irepo.batched_logprobs(m, prompt_ids * 2, responses, 0, 16)
        assert torch.allclose(saved, under(models[t - 1]), atol=1e-4)
        assert (saved - under(models[t])).abs().max() > 1e-2


@pytest.mark.parametrize("loss", ["dpo", "ipo", "soft-dpo"])
def test_baselines_run_and_report_the_same_metrics(warm_tiny, tmp_path, loss):
    """--loss dpo, ipo and soft-dpo run the same loop and write the same outputs and keys."""
    out = tmp_path / loss
    rows = run_with_warmup(warm_tiny, str(out), "--loss", loss)
    assert [r["loss_type"] for r in rows] == [loss, loss]
    assert METRIC_KEYS <= set(rows[-1])
    assert (out / "iteration_2" / "pairs.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# The theory (python irepo.py --theory), asserted with the tolerances the README states.
# ---------------------------------------------------------------------------------------------

def test_theory_optimality_under_exact_preferences():
    """Claim 1: with exact preferences, minimizing the iREPO loss reaches
    pi* = pi_ref exp(r/beta)/Z within 1e-3 in log-probability, for three betas and for uniform,
    on-policy and best-vs-worst pairs. Deterministic: no sampling is involved."""
    errors = irepo.theory_optimality(betas=(0.1, 0.5, 1.0))
    assert len(errors) == 9
    assert max(errors.values()) <= 1e-3, errors


def test_theory_pair_weights_are_distributions_with_full_support():
    """Every pair scheme gives each pair a positive probability (the theorem's condition), and
    the on-policy and best-worst weights sum to P(the two draws differ) per prompt."""
    log_ref, r = irepo.tabular_world(0)
    pi = log_ref.exp()
    for scheme in ("uniform", "on-policy", "best-worst"):
        w = irepo.pair_weights(scheme, log_ref, r)
        assert (w > 0).all(), scheme
    assert torch.allclose(irepo.pair_weights("on-policy", log_ref, r).sum(-1), 1 - (pi ** 2).sum(-1))
    k = 4  # best-worst of 4 draws: the pair is degenerate only if all 4 draws are equal
    assert torch.allclose(irepo.pair_weights("best-worst", log_ref, r, k).sum(-1), 1 - (pi ** k).sum(-1))


def test_theory_gap_falls_with_annotators():
    """Claim 2: the suboptimality beta KL(pi_N || pi*) averaged over 20 seeded worlds falls at
    every step of N = 1, 4, 16, 64, 256, and at N = 256 is below a tenth of N = 1.
    Seeded; the printed standard errors are about a tenth
    of each mean, and consecutive means differ by factors of 3, so an ordering failure would be
    a many-sigma event, not chance."""
    gaps = irepo.theory_annotators(ns=(1, 4, 16, 64, 256), seeds=20)
    means = [gaps[n][0] for n in (1, 4, 16, 64, 256)]
    assert all(b < a for a, b in zip(means, means[1:])), means
    assert means[-1] < 0.1 * means[0]


def test_theory_iterations_compose():
    """Claim 3: T exact iterations, each with reference pi_t, give pi_0 exp(T r/beta)/Z within
    1e-3, for T = 1, 2, 3."""
    errors = irepo.theory_iterations(ts=(1, 2, 3))
    assert max(errors.values()) <= 1e-3, errors


def test_theory_hard_labels():
    """Claim 4: on one vote per pair, DPO's winner-loser log-ratio gap keeps growing (step 4000
    exceeds step 1000 by more than 5 nats, pi(y_l) -> 0) while iREPO's converges to the finite
    target/beta and changes by less than 1% between steps 1000 and 4000."""
    rows = {step: row for step, *row in irepo.theory_hard_labels(steps=4000, every=1000)}
    dpo_1k, irepo_1k, _ = rows[1000]
    dpo_4k, irepo_4k, loser_4k = rows[4000]
    assert dpo_4k > dpo_1k + 5.0
    assert loser_4k < 1e-12
    assert abs(irepo_4k - irepo_1k) < 0.01 * abs(irepo_1k)
    assert irepo_4k == pytest.approx(math.log(3.0) / 0.1, rel=1e-3)  # logit(0.75) / beta


def test_theory_report_prints_every_claim(capsys):
    """python irepo.py --theory prints one table per claim."""
    irepo.main(["--theory"])
    out = capsys.readouterr().out
    for claim in ("Claim 1.", "Claim 2.", "Claim 3.", "Claim 4.", "Claim 5."):
        assert claim in out
    assert "log-log slope" in out


# ---------------------------------------------------------------------------------------------
# Runs that stop, refusals and errors (every bad input: exit 2, one line, no traceback).
# ---------------------------------------------------------------------------------------------

TIMING_KEYS = {"seconds_sample", "seconds_annotate", "seconds_reference", "seconds_train", "seconds_eval", "sample_tokens_per_s",
               "train_tokens_per_s", "peak_memory_mb"}


def cli(*argv, timeout=300, popen=False, **env):
    """Run the real command line, as child() starts it."""
    return child([sys.executable, os.path.join(HERE, "irepo.py"), *argv], timeout, popen, **env)


def assert_one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert errors[0].startswith("irepo.py: error: ")


def metrics_without_timing(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def test_refuses_to_mix_runs(warm_tiny, tmp_path):
    """A second run into the same --out is refused without --resume or --overwrite; --resume with
    other settings is refused and names them; --overwrite starts again."""
    out = tmp_path / "run"
    run_with_warmup(warm_tiny, str(out))
    assert_one_line_error(cli(*small_run_args(out)), f"--out {out} already holds a run (2 complete iterations)")
    proc = cli(*small_run_args(out, "--resume", "--beta", "0.5", "--num-responses", "3"))
    assert_one_line_error(proc, "was written with other settings: --beta 1.0 (now 0.5), --num-responses 4 (now 3)")
    assert_one_line_error(cli(*small_run_args(out, "--resume", "--overwrite")), "argument --overwrite: not allowed with argument --resume")
    proc = cli(*small_run_args(out, "--overwrite", "--iterations", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "iteration_2").exists() and (out / "iteration_1").exists()


def test_resume_with_nothing_to_resume_starts_the_run(warm_tiny, tmp_path, capsys):
    """Job scripts on preemptible machines always pass --resume: on a folder that holds no run
    it says so in one line and starts one, instead of stopping."""
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--resume")
    assert f"--resume: {out}/ holds no run to resume; starting one" in capsys.readouterr().out
    assert [row["iteration"] for row in rows] == [1]


def test_rules_read_decimal_bounds():
    """The bounds of a SETTINGS rule are read with their decimals (a rule '> 0.5' is not '> 0'),
    and the words in parentheses that explain a rule are not read as bounds."""
    assert [bound for _, bound in irepo.bounds(">= 0 and < 1")] == [0.0, 1.0]
    assert [bound for _, bound in irepo.bounds("> 0.5")] == [0.5]
    assert [bound for _, bound in irepo.bounds(">= 0 (0: full fine-tuning)")] == [0.0]
    parse = irepo.checked("--x", float, "> 0.5")
    assert parse("0.75") == 0.75
    with pytest.raises(SystemExit):
        parse("0.25")


@pytest.fixture(scope="module")
def uninterrupted_out(warm_tiny, tmp_path_factory):
    """An uninterrupted 3-iteration run, for the resume and many-process tests to match."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_with_warmup(warm_tiny, str(out), "--iterations", "3")
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_out):
    return metrics_without_timing(uninterrupted_out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=lambda sig: sig.name)
def test_killed_run_resumes_to_the_same_metrics(warm_tiny, uninterrupted, tmp_path, sig):
    """A run killed mid-iteration (after iteration 1 is complete) and resumed with --resume ends
    with the same metrics as an uninterrupted run, bit for bit apart from wall-clock timings.
    SIGINT and SIGTERM also print how to resume."""
    out = tmp_path / "run"
    os.makedirs(out)
    shutil.copytree(warm_tiny, out / "warmup")
    proc = cli(*small_run_args(out, "--iterations", "3"), popen=True)
    deadline = time.time() + 240
    while not (out / "iteration_1").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    done = irepo.complete_iterations(str(out))
    assert 1 <= done < 3, f"the signal did not land mid-run ({done} iterations complete)"
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "Traceback" not in err
        assert f"{done} complete iterations are kept" in err
        assert "Resume with: python irepo.py" in err and err.strip().endswith("--resume")
    resumed = cli(*small_run_args(out, "--iterations", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after iteration {done}" in resumed.stdout
    assert metrics_without_timing(out) == uninterrupted
    assert not list(out.glob("*.tmp"))


def test_pairs_file_reproduces_a_training_step(warm_tiny, tmp_path):
    """--pairs on a saved iteration_1/pairs.jsonl, from the same pi_0 and seed, trains to the
    very same weights as the run that wrote it."""
    from transformers import AutoModelForCausalLM
    first = tmp_path / "first"
    rows = run_with_warmup(warm_tiny, str(first), "--iterations", "1")
    again = tmp_path / "again"
    rows_again = run_with_warmup(warm_tiny, str(again), "--iterations", "1",
                                 "--pairs", str(first / "iteration_1" / "pairs.jsonl"))
    assert rows_again[0]["loss"] == rows[0]["loss"] and rows_again[0]["pairs"] == rows[0]["pairs"]
    a = AutoModelForCausalLM.from_pretrained(first / "iteration_1").state_dict()
    b = AutoModelForCausalLM.from_pretrained(again / "iteration_1").state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], AutoModelForCausalLM.from_pretrained(first / "warmup").state_dict()["lm_head.weight"])


def test_pairs_file_with_text_only_and_degenerate_pairs(warm_tiny, tmp_path):
    """Pairs given as text (no token ids), labelled by votes (smoothed; they win over a p_hat on
    the same line) or by p_hat (as given), train; pairs of identical or empty responses are
    skipped and counted in skipped_pairs."""
    lines = [
        {"prompt": "review the hotel", "response_a": "the hotel was great .", "response_b": "the hotel was bad .", "votes_a": 4, "n_annotators": 4, "p_hat": 0.1},
        {"prompt": "describe the car", "response_a": "the car was fun .", "response_b": "the car was dull .", "p_hat": 0.8},
        {"prompt": "review the book", "response_a": "the book was poor .", "response_b": "the book was good .", "votes_a": 1, "n_annotators": 4},
        {"prompt": "review the park", "response_a": "the park was fine .", "response_b": "the park was fine .", "p_hat": 0.5},
        {"prompt": "review the song", "response_a": "", "response_b": "the song was fine .", "p_hat": 0.3},
    ]
    path = tmp_path / "given.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--pairs", str(path))
    assert rows[0]["pairs"] == 3 and rows[0]["skipped_pairs"] == 2
    saved = [json.loads(line) for line in open(out / "iteration_1" / "pairs.jsonl")]
    assert [p["target_logit"] for p in saved] == pytest.approx([math.log(9.0), math.log(4.0), math.log(1.5 / 3.5)])


def test_a_chunk_left_without_pairs_stops_with_one_line(warm_tiny, tmp_path):
    """Given pairs that are all ties (p_hat = 1/2) leave DPO nothing to learn from: without_ties
    drops them, and the run stops with one line that names ties, not responses, as the cause."""
    path = tmp_path / "ties.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"review the {topic}", "response_a": f"the {topic} was great .",
                                        "response_b": f"the {topic} was bad .", "votes_a": 2, "n_annotators": 4}) + "\n"
                            for topic in ("hotel", "car")))
    out = tmp_path / "run"
    proc = small_tiny_run(warm_tiny, str(out), "--pairs", str(path), "--loss", "dpo")
    assert_one_line_error(proc, "iteration 1: no pair is left to learn from (identical or empty "
                                "responses, or ties under dpo/ipo)")


def assert_main_stops(argv, message):
    """In-process twin of assert_one_line_error, for the many cheap cases."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        irepo.main(argv)
    assert stop.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("irepo.py: error: ") and message in lines[0], lines


def assert_bad_files_stop(tmp_path, flag, cases):
    """Each file (bytes, text, or None for missing) stops main with its message, before --out."""
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        assert_main_stops([flag, str(path), "--out", str(tmp_path / "out")], message.format(path=path))
        assert not (tmp_path / "out").exists()


def test_bad_pairs_files_name_the_line_and_field(tmp_path):
    """Every malformed pairs file stops before any work, naming the file, line and field."""
    good = '{"prompt": "p", "response_a": "a", "response_b": "b", "p_hat": 0.7}'
    cases = {
        "missing.jsonl": (None, "--pairs {path}: cannot be read (No such file"),
        "empty.jsonl": ("\n", "--pairs {path}: the file holds no pair"),
        "latin1.jsonl": (b"\xe9t\xe9\n", "--pairs {path}: not UTF-8 text"),
        "broken.jsonl": (good + "\n{not json\n", "{path}:2: malformed JSON"),
        "array.jsonl": ("[1, 2]\n", "{path}:1: expected a JSON object"),
        "nofield.jsonl": ('{"prompt": "p", "response_a": "a", "p_hat": 0.5}\n', "{path}:1: field 'response_b' must be a string"),
        "phat.jsonl": (good + "\n" + good.replace("0.7", "1.0") + "\n", "{path}:2: field 'p_hat' must be a number strictly between 0 and 1"),
        "nan.jsonl": (good.replace('"p_hat": 0.7', '"p_hat": NaN') + "\n", "{path}:1: field 'p_hat' must be a number strictly between 0 and 1"),
        "votes.jsonl": (good.replace('"p_hat": 0.7', '"votes_a": 5, "n_annotators": 4') + "\n", "{path}:1: field 'votes_a' must be a number in [0, n_annotators]"),
        "nolabel.jsonl": (good.replace(', "p_hat": 0.7', '') + "\n", "{path}:1: field 'p_hat' must be a number strictly between 0 and 1 (or give 'votes_a' and 'n_annotators'), got None"),
        "ids.jsonl": (good.replace("}", ', "a_ids": [1, -2]}') + "\n", "{path}:1: field 'a_ids' must be a list of token ids"),
    }
    assert_bad_files_stop(tmp_path, "--pairs", cases)


def test_bad_inputs_stop_before_work(tmp_path):
    """Non-UTF-8 prompts, an --out that cannot be written, a model that cannot be loaded, and
    more held-out prompts than exist: exit 2, one line, no traceback."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    assert_one_line_error(cli("--prompts", str(latin1), "--out", str(tmp_path / "o")),
                          f"--prompts {latin1}: not UTF-8 text")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli("--out", str(blocker / "out")), f"--out {blocker / 'out'}: cannot be written")
    assert_one_line_error(cli("--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")),
                          f"--model {tmp_path / 'no-such-model'}: no such folder")
    assert_one_line_error(cli("--eval-prompts", "1000", "--out", str(tmp_path / "o2")),
                          "--eval-prompts 1000: only 640 prompts exist")
    assert not (tmp_path / "o2").exists()


def test_non_finite_loss_stops_and_keeps_completed_iterations(warm_tiny, tmp_path, capsys):
    """A learning rate that blows the weights up makes the loss non-finite: the run stops with
    one line, exit 2, and no half-written iteration."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_with_warmup(warm_tiny, str(out), "--lr", "1e30")
    assert stop.value.code == 2
    errors = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(errors) == 1 and "became non-finite" in errors[0] and "--lr" in errors[0]
    assert not list(out.glob("iteration_*"))


def test_full_disk_keeps_the_previous_iteration(warm_tiny, tmp_path, capsys, monkeypatch):
    """If the disk fills up while iteration 2 is written, the run stops with one line and exit 2,
    iteration 1 stays complete and loadable, and nothing half-written is left."""
    import errno
    from transformers import AutoModelForCausalLM, PreTrainedModel
    real = PreTrainedModel.save_pretrained

    def save_or_fill(self, folder, *a, **k):
        if "iteration_2" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, folder, *a, **k)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_or_fill)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_with_warmup(warm_tiny, str(out))
    assert stop.value.code == 2
    errors = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "--resume" in errors[0]
    assert sorted(p.name for p in out.glob("iteration_*")) == ["iteration_1"]
    AutoModelForCausalLM.from_pretrained(out / "iteration_1")
    assert len(metrics_without_timing(out)) == 1


def test_write_errors_quote_the_os(warm_tiny, tmp_path, capsys, monkeypatch):
    """A write error that is not a full disk is quoted as the OS gave it, and the message does
    not tell the user to free space."""
    import errno
    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith("iteration_1"):
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SystemExit) as stop:
        run_with_warmup(warm_tiny, str(tmp_path / "run"), "--iterations", "1")
    assert stop.value.code == 2
    errors = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(errors) == 1 and "(Directory not empty)" in errors[0], errors
    assert "free some space" not in errors[0] and "--resume" in errors[0]


# ---------------------------------------------------------------------------------------------
# The paper's settings on tiny random-weight models of the real architectures, and annotators.
# ---------------------------------------------------------------------------------------------

LLM_WORDS = sorted(set(" ".join(irepo.tiny_prompts() + irepo.POSITIVE + irepo.NEGATIVE + irepo.NEUTRAL
                                + irepo.ASPECTS + ["the was and . A B Which response"]).split()))


def save_tiny(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    """Tiny random-weight Phi, Mistral and DeBERTa-v2 (reward model) folders with a word-level
    tokenizer, as from_pretrained would find real ones. Phi keeps a residual dropout of 0.5."""
    from transformers import (DebertaV2Config, DebertaV2ForSequenceClassification, MistralConfig,
                              MistralForCausalLM, PhiConfig, PhiForCausalLM)
    root = tmp_path_factory.mktemp("llms")
    tok = word_tokenizer(LLM_WORDS)
    v = len(tok)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=256, resid_pdrop=0.5, **ids))
    mistral = MistralForCausalLM(MistralConfig(vocab_size=v, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256, **ids))
    rm = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=v, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            max_position_embeddings=256, num_labels=1, pad_token_id=0))
    return {name: save_tiny(root / name, model, tok) for name, model in
            (("phi", phi), ("mistral", mistral), ("deberta", rm))}


LLM_SMALL = ["--iterations", "1", "--prompts-per-iteration", "6", "--eval-prompts", "4", "--max-new-tokens", "6",
             "--batch-size", "4", "--micro-batch-size", "2", "--sample-batch-size", "8"]


@pytest.mark.parametrize("arch,preset", [("phi", "phi-2"), ("mistral", "mistral-7b")])
def test_paper_presets_run_on_local_folders(llm_dirs, offline_hub, tmp_path, arch, preset):
    """--model DIR --preset phi-2 (or mistral-7b), scaled down by flags: the preset's values are
    applied and printed (LoRA, lr 5e-6, beta 0.01, gradient checkpointing), with the prompts'
    source and the job's size; one iteration runs with LoRA on UltraFeedback's prompts (a stand-in
    in the hub's cache), and the saved iteration is a plain model that from_pretrained loads, with
    weights that moved."""
    from transformers import AutoModelForCausalLM
    write_hub_files(offline_hub, {"evol_instruct.jsonl": irepo.tiny_prompts()[:12] * 2}
                    | {name: [] for name in irepo.ULTRAFEEDBACK_FILES[1:]})
    out = tmp_path / "run"
    proc = cli("--model", llm_dirs[arch], "--preset", preset, "--annotators", "sim", "--out", str(out), *LLM_SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "prompts: 12 distinct instructions of UltraFeedback (openbmb/UltraFeedback)" in lines
    assert ("job per iteration (T = 1): 6 prompts x K 4 = 24 responses to sample, at most 24 x "
            "--max-new-tokens 6 = 144 new tokens") in lines
    assert sum(line.startswith("note: a real checkpoint on a CPU is a smoke test") for line in lines) == 1
    config = next(line for line in lines if line.startswith("config: "))
    for setting in (f"preset={preset}", "lr=5e-06", "beta=0.01", "lora_rank=128", "lora_alpha=128.0",
                    "gradient_checkpointing=True",
                    "epochs=1", "warmup_ratio=0.1"):
        assert setting in config, setting
    before = AutoModelForCausalLM.from_pretrained(llm_dirs[arch]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "iteration_1").state_dict()
    assert set(after) == set(before)  # no adapter left behind: a plain model
    assert any(not torch.equal(after[n], before[n]) for n in before if "proj" in n or "fc" in n or "dense" in n)
    assert json.loads((out / "metrics.jsonl").read_text())["pairs"] >= 1
    prompts = [json.loads(line)["prompt"] for line in open(out / "iteration_1" / "pairs.jsonl")]
    assert set(prompts) <= set(irepo.tiny_prompts()[:12])  # without --prompts, UltraFeedback's


def test_presets_follow_the_model_name_and_yield_to_flags():
    """Phi-2 and Mistral-7B (base and Instruct) names pick their presets; --preset and every
    flag override; 'tiny' stays the default."""
    assert irepo.parse_args([]).preset == "tiny"
    phi = irepo.parse_args(["--model", "microsoft/phi-2"])
    assert (phi.preset, phi.lr, phi.beta, phi.lora_rank, phi.chat_format) == ("phi-2", 5e-6, 0.01, 128, "chatml")
    assert phi.lora_alpha == 128 and phi.lora_targets == "q_proj,k_proj,v_proj,dense"  # the authors' runs
    for name in ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"):
        args = irepo.parse_args(["--model", name])
        assert args.preset == "mistral-7b" and "gate_proj" in args.lora_targets and args.gradient_checkpointing
    args = irepo.parse_args(["--model", "microsoft/phi-2", "--lr", "1e-5", "--lora-rank", "0",
                             "--no-gradient-checkpointing"])
    assert (args.lr, args.lora_rank, args.gradient_checkpointing) == (1e-5, 0, False)
    assert irepo.parse_args(["--model", "some/folder", "--preset", "mistral-7b"]).batch_size == 8
    args = irepo.parse_args(["--smoothing", "0.25", "--warmup-ratio", "0", "--lora-alpha", "8"])
    assert (args.smoothing, args.warmup_ratio, args.lora_alpha) == (0.25, 0.0, 8.0)


def test_saved_lora_model_matches_the_adapted_one():
    """The plain model that an iteration saves (the adapters added into the weights) computes
    every log-prob of the adapted model (to fp32 rounding), for nn.Linear (Llama) and GPT-2's
    Conv1D alike, and has a plain model's keys."""
    for kind, targets in (("llama", "q_proj,v_proj,down_proj"), ("gpt2", "c_attn,c_fc")):
        model = tiny_causal_lm(kind, vocab_size=40)
        keys = set(model.state_dict())
        params = irepo.add_lora(model, 4, 8, irepo.lora_layers(model, targets))
        assert params and all(p.requires_grad for p in params)
        torch.manual_seed(1)
        for p in params:
            p.data.normal_(0, 0.2)  # a trained adapter: B is no longer zero
        for _, module in irepo.lora_wrappers(model):
            module.freeze()
        ids, attn, resp = irepo.collate([[5, 6, 7], [8]], [[9, 10, 1], [11, 12]], pad_id=0, device="cpu")
        plain = tiny_causal_lm(kind, vocab_size=40)
        state = irepo.plain_state_dict(model)
        assert set(state) == keys
        with torch.no_grad():
            adapted = irepo.sequence_logprobs(model, ids, attn, resp)
            assert (irepo.sequence_logprobs(plain, ids, attn, resp) - adapted).abs().max() > 1e-3
            plain.load_state_dict(state)
            merged = irepo.sequence_logprobs(plain, ids, attn, resp)
        assert torch.allclose(adapted, merged, atol=1e-4), (kind, adapted, merged)


def lora_steps(model, lr, targets="q_proj,v_proj,down_proj", steps=4):
    """`steps` LoRA steps (rank 4) that raise the log-probs of 8 fixed responses; returns their
    log-probs before, at the end of training (adapters live) and after trainable() exits."""
    prompt_ids = [[5, 6, 7]] * 8
    responses = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0)).tolist()
    batch = irepo.collate(prompt_ids, responses, 0, "cpu")
    settings = irepo.Training(lr=lr, epochs=1, batch_size=8 // steps, micro_batch_size=2,
                              warmup_ratio=0.0, lora_rank=4, lora_alpha=4.0, lora_targets=targets)

    def micro_loss(indices, epoch):
        micro = irepo.collate([prompt_ids[i] for i in indices], [responses[i] for i in indices],
                              0, "cpu")
        return -irepo.sequence_logprobs(model, *micro).sum()
    with torch.no_grad():
        before = irepo.sequence_logprobs(model, *batch)
    with irepo.trainable(model, settings) as params:
        irepo.fit(params, 8, micro_loss, settings, "test")
        with torch.no_grad():
            trained = irepo.sequence_logprobs(model, *batch)
    with torch.no_grad():
        after = irepo.sequence_logprobs(model, *batch)
    return before, trained, after


@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_bf16_policy_after_an_iteration_is_the_one_that_trained(lr):
    """Silent bug caught: at the end of each iteration the fp32 LoRA update was added into bf16
    weights, which rounded away much of it (at lr 1e-5 here the log-probs moved by 5e-4 and the
    merge changed them by 1e-3, twice the update), so pi_{t+1}, the next reference, was not the
    trained policy. Now, in a bf16 model, the policy after an iteration (the next reference)
    gives exactly the trained policy's log-probs, after a first and after a second iteration."""
    model = tiny_causal_lm("llama", 40).to(torch.bfloat16)
    before, trained, after = lora_steps(model, lr)
    assert (trained - before).abs().max() > 1e-4  # it trained
    assert torch.equal(after, trained)
    _, trained, after = lora_steps(model, lr)  # a second iteration stacks its own adapter
    assert torch.equal(after, trained)


def test_fresh_adapters_start_at_pi_t():
    """With B = 0 a freshly adapted model computes exactly pi_t, so the reference log-probs
    taken before training equal the policy's at step 0."""
    model = tiny_causal_lm("llama", vocab_size=40)
    ids, attn, resp = irepo.collate([[5, 6]], [[9, 10, 1]], pad_id=0, device="cpu")
    with torch.no_grad():
        before = irepo.sequence_logprobs(model, ids, attn, resp)
        irepo.add_lora(model, 4, 8, irepo.lora_layers(model, "q_proj,v_proj"))
        assert torch.equal(irepo.sequence_logprobs(model, ids, attn, resp), before)


def test_loaded_policy_has_no_dropout(llm_dirs):
    """load_policy zeroes dropout (Phi here has 0.5), so train mode, which gradient
    checkpointing needs, computes the same log-probs as eval mode."""
    args = irepo.parse_args(["--model", llm_dirs["phi"], "--lora-rank", "0"])
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), llm_dirs["phi"])
    ids, attn, resp = irepo.collate([[5, 6, 7]], [[9, 10, 11, 12]], pad_id=0, device="cpu")
    with torch.no_grad():
        model.train()
        train_mode = irepo.sequence_logprobs(model, ids, attn, resp)
        model.eval()
        assert torch.equal(train_mode, irepo.sequence_logprobs(model, ids, attn, resp))
    assert tokenizer.chat_template == irepo.CHAT_TEMPLATES["chatml"]  # the preset's format


def small_tiny_run(warm_tiny, out, *extra):
    os.makedirs(out, exist_ok=True)
    shutil.copytree(warm_tiny, os.path.join(out, "warmup"), dirs_exist_ok=True)
    return cli(*small_run_args(out, "--iterations", "1"), *extra)


def saved_pairs(out):
    return [json.loads(line) for line in open(os.path.join(out, "iteration_1", "pairs.jsonl"))]


def test_llm_judge_annotator(warm_tiny, llm_dirs, tmp_path):
    """judge:DIR (a local causal LM) answers a probability per pair, asked in both orders: each
    pair has one annotator and a fractional vote, so p_hat = (v + 0.5) / 2."""
    out = tmp_path / "run"
    proc = small_tiny_run(warm_tiny, str(out), "--annotators", f"judge:{llm_dirs['mistral']}",
                          "--label", "votes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = saved_pairs(out)
    assert pairs and all(p["n_annotators"] == 1 and 0 < p["votes_a"] < 1 for p in pairs)
    assert all(p["p_hat"] == pytest.approx((p["votes_a"] + 0.5) / 2) for p in pairs)
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["true_reward"] is None
    # The win-rate is the judge's mean probability that pi_1's held-out text beats pi_0's.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "iteration_1")
    texts = [irepo.decode(tok, json.loads((out / name).read_text())["responses"])
             for name in ("iteration_1/eval.json", "initial_eval.json")]
    args = irepo.parse_args(small_run_args(out, "--iterations", "1", "--annotators",
                                           f"judge:{llm_dirs['mistral']}", "--label", "votes"))
    prompts, _ = irepo.split_prompts(irepo.tiny_prompts(), args)
    panel = irepo.build_panel(args, torch.device("cpu"), 128)
    expected = float(panel.compare(prompts, *texts).mean())
    assert row["win_rate_vs_initial"] == pytest.approx(expected, abs=1e-5)


def test_judge_averages_both_orders(llm_dirs):
    """The judge's answer for (a, b) is 1 - its answer for (b, a), and exactly 1/2 for a pair of
    identical responses, although a random judge asked in one order has a position bias: asking
    in both orders and averaging cancels it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llm_dirs["mistral"])
    tok.chat_template = irepo.CHAT_TEMPLATES["chatml"]
    model = AutoModelForCausalLM.from_pretrained(llm_dirs["mistral"]).eval()
    judge = irepo.JudgeAnnotator(model, tok, 4, 512)
    q, a, b = ["review the hotel"] * 3, ["the hotel was great .", "the food was bad .", "fine"], ["the hotel was bad .", "the room was fun .", "dull"]
    ab, ba = judge.compare(q, a, b)[:, 0], judge.compare(q, b, a)[:, 0]
    assert torch.allclose(ab + ba, torch.ones(3), atol=1e-6)
    assert torch.allclose(judge.compare(q, a, a)[:, 0], torch.full((3,), 0.5), atol=1e-6)
    ids = irepo.encode_prompt(tok, irepo.JUDGE_QUESTION.format(prompt=q[0], a=a[0], b=a[0]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    one_order = torch.sigmoid(logits[judge.labels[0]] - logits[judge.labels[1]])
    assert abs(float(one_order) - 0.5) > 1e-4  # a random judge has a position bias


def test_reward_model_annotator(warm_tiny, llm_dirs, tmp_path):
    """rm:DIR (a DeBERTa-v2 sequence classifier) gives p = sigma(r_a - r_b) per pair."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path / "run"
    proc = small_tiny_run(warm_tiny, str(out), "--annotators", f"rm:{llm_dirs['deberta']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = saved_pairs(out)
    rm = AutoModelForSequenceClassification.from_pretrained(llm_dirs["deberta"]).eval()
    tok = AutoTokenizer.from_pretrained(llm_dirs["deberta"])
    for p in pairs[:3]:
        with torch.no_grad():
            r = [rm(**tok(p["prompt"], y, return_tensors="pt")).logits[0, 0] for y in (p["response_a"], p["response_b"])]
        assert p["votes_a"] == pytest.approx(float(torch.sigmoid(r[0] - r[1])), abs=1e-4)


def test_judge_mixed_with_simulated(warm_tiny, llm_dirs, tmp_path):
    """'judge:DIR,sim:3' mixes an LLM judge with 3 simulated voters: 4 answers per pair, and the
    true reward is known (from the simulated voters)."""
    out = tmp_path / "run"
    proc = small_tiny_run(warm_tiny, str(out), "--annotators", f"judge:{llm_dirs['mistral']},sim:3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p["n_annotators"] == 4 for p in saved_pairs(out))
    assert json.loads((out / "metrics.jsonl").read_text())["true_reward"] is not None


def test_models_and_annotators_that_cannot_be_loaded(warm_tiny, tmp_path):
    """A hub name without network says it cannot be downloaded (with an empty Hugging Face
    cache: a copy cached on this machine would load); a folder that is not a model says so; a
    malformed panel is named."""
    empty_cache = str(tmp_path / "cache")
    proc = cli("--model", "microsoft/phi-2", "--prompts", "tiny", "--out", str(tmp_path / "a"),
               HF_HOME=empty_cache, HF_HUB_CACHE=empty_cache)
    assert_one_line_error(proc, "--model microsoft/phi-2: cannot be loaded (cannot be downloaded: "
                                "no network, or no such model;")
    assert "use --model tiny or a local folder" in proc.stderr
    assert not (tmp_path / "a" / "config.json").exists()  # nothing was claimed
    (tmp_path / "empty").mkdir()
    shutil.copytree(warm_tiny, tmp_path / "b" / "warmup")
    assert_one_line_error(cli("--annotators", f"rm:{tmp_path / 'empty'}", "--out", str(tmp_path / "b")),
                          f"--annotators rm:{tmp_path / 'empty'}: cannot be loaded (not a model folder;")
    assert_one_line_error(cli("--annotators", "sim,oracle", "--out", str(tmp_path / "c")),
                          "--annotators sim,oracle: cannot read 'oracle'")


def test_missing_model_folders_stop_before_any_work(tmp_path):
    """A --model, judge: or rm: path that does not exist is named as a missing folder (not with
    the hub's wording) before anything is built: no --out, no warm-up."""
    for argv, label in ((["--model", str(tmp_path / "nope")], f"--model {tmp_path / 'nope'}"),
                        (["--annotators", f"judge:{tmp_path / 'j'}"], f"--annotators judge:{tmp_path / 'j'}"),
                        (["--annotators", "sim,rm:./no/such/rm"], "--annotators rm:./no/such/rm")):
        assert_main_stops(argv + ["--out", str(tmp_path / "out")], f"{label}: no such folder")
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The reward-KL frontier (python irepo.py --compare).
# ---------------------------------------------------------------------------------------------

def test_interpolation_and_matched_kl_table():
    """interpolate() is linear between the points around x (in order of x) and None outside;
    a seed's frontier is the upper envelope of its points over every beta, flat to its largest
    KL; the verdict names a pair only when every seed of one beats every seed of the other.
    Hand-computed values."""
    assert irepo.interpolate([(3.0, 3.0), (1.0, 1.0)], 2.5) == pytest.approx(2.5)
    assert irepo.interpolate([(1.0, 1.0), (3.0, 3.0)], 0.5) is None
    assert irepo.interpolate([(1.0, 1.0), (3.0, 3.0)], 3.5) is None
    point = lambda curve, beta, seed, kl, reward: dict(curve=curve, beta=beta, seed=seed,
                                                       kl_to_initial=kl, true_reward=reward)
    rows = [point("a", 1, 0, 1.0, 1.0), point("a", 1, 0, 3.0, 3.0),   # beta 1: y = x
            point("a", 2, 0, 2.0, 4.0), point("a", 2, 0, 4.0, 4.0),   # beta 2: flat at 4
            point("a", 1, 1, 1.0, 2.0), point("a", 1, 1, 4.0, 5.0),   # seed 1: y = x + 1
            point("b", 1, 0, 0.0, 0.0), point("b", 1, 0, 4.0, 2.0),   # y = x / 2
            point("b", 1, 1, 0.0, 1.0), point("b", 1, 1, 4.0, 1.0)]   # flat at 1
    table = irepo.matched_rewards(rows, [1.0, 2.0, 3.5])
    assert table["a"] == {1.0: [1.0, 2.0], 2.0: [4.0, 3.0], 3.5: [4.0, 4.5]}
    assert table["b"] == {1.0: [0.5, 1.0], 2.0: [1.0, 1.0], 3.5: [1.75, 1.0]}
    assert irepo.verdict(table, 2.0) == "a > b"          # 3 and 4 both beat 1 and 1
    assert irepo.verdict(table, 1.0) == "within noise"   # a's 1.0 does not beat b's 1.0


def test_every_seed_reaches_every_matched_level():
    """The top KL level is the smallest of the seeds' largest KLs itself, so the seed whose
    largest KL that is still reaches it: every curve's cell holds all its seeds. The ranges are
    ones where low + (high - low) * 4 / 4 rounds one ulp above high (about 4% of ranges do)."""
    for low, high in [(0.0017733699792932267, 2.9919450117833972), (0.1, 0.7), (0.3, 1.1)]:
        rows = [dict(curve=curve, seed=seed, kl_to_initial=kl, true_reward=kl)
                for curve in ("irepo", "dpo") for seed in range(3)
                for kl in (low, high + (seed != 1) * 0.5)]  # seed 1's largest KL is `high`
        levels = irepo.matched_levels(rows)
        assert len(levels) == 5 and levels[0] == low and levels[-1] == high
        table = irepo.matched_rewards(rows, levels)
        assert all(len(table[curve][level]) == 3 for curve in table for level in levels)


@pytest.fixture(scope="module")
def tiny_compare(warm_tiny, tmp_path_factory):
    """A tiny --compare sweep, run once for the module: two curves (the default label and
    --label fresh), beta 1, seeds 0 and 1, 2 iterations at a learning rate high enough that each
    seed's KL range is wide and all share one (1.24 to 1.71 nats when written). Returns (its
    folder, what it printed)."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    shutil.copytree(warm_tiny, out / "warmup")
    args = irepo.parse_args(small_run_args(out, "--compare", "--lr", "1e-3"))
    grid = {"irepo": ("irepo", "zermelo", (1.0,)), "irepo-fresh": ("irepo", "fresh", (1.0,))}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        irepo.compare_losses(args, grid=grid, seeds=2)
    return out, printed.getvalue()


def test_compare_writes_a_frontier(tiny_compare):
    """A tiny sweep writes frontier.jsonl with one well-formed point per run and iteration, each
    labelled with its curve and label; each run used its curve's label; the matched-KL table is
    printed."""
    out, printed = tiny_compare
    rows = [json.loads(line) for line in open(out / "frontier.jsonl")]
    assert [(r["curve"], r["label"], r["beta"], r["seed"], r["iteration"]) for r in rows] == [
        (curve, label, 1.0, seed, iteration) for curve, label in
        (("irepo", "zermelo"), ("irepo-fresh", "fresh")) for seed in (0, 1) for iteration in (1, 2)]
    for r in rows:
        assert set(r) == {"curve", "loss", "label", "beta", "seed", "iteration", "kl_to_initial",
                          "true_reward", "win_rate_vs_initial"}
        assert all(math.isfinite(r[k]) for k in ("kl_to_initial", "true_reward", "win_rate_vs_initial"))
    config = json.load(open(out / "compare" / "irepo-fresh_beta1.0_seed1" / "config.json"))
    assert config["label"] == "fresh" and config["loss"] == "irepo"
    assert "True reward at matched KL" in printed


SVG = "{http://www.w3.org/2000/svg}"


def svg_axis(root, name):
    """An axis of frontier.svg read back from its tick labels: pixel -> value, the inverse of the
    drawing's scale. Each label's text is its value, the ticks lie on one straight line, and KL
    grows to the right, reward upwards."""
    ticks = [(float(text.get("data-tick-" + name)), float(text.get("x" if name == "kl" else "y")),
              text.text) for text in root.iter(SVG + "text") if text.get("data-tick-" + name)]
    assert len(ticks) >= 3 and all(float(label) == value for value, _, label in ticks)
    (first_value, first_pixel, _), (last_value, last_pixel, _) = ticks[0], ticks[-1]
    assert (last_pixel - first_pixel) * (last_value - first_value) * (1 if name == "kl" else -1) > 0

    def value(pixel):
        return first_value + (last_value - first_value) * (pixel - first_pixel) / (
            last_pixel - first_pixel)
    for tick_value, pixel, _ in ticks:
        assert value(pixel) == pytest.approx(tick_value, abs=1e-6)
    return value


def test_frontier_svg_matches_frontier_jsonl(tiny_compare):
    """frontier.svg, parsed as XML, draws what frontier.jsonl holds: one line per (curve, seed)
    through that seed's frontier (upper envelope over beta, flat to its largest KL), and for each
    curve the mean +- std over seeds at each matched KL level, the numbers the table prints. Every
    position is read back through the axes' tick labels, so a wrong scale fails; one colour per
    curve, each named in the legend."""
    import xml.etree.ElementTree as ElementTree
    out, printed = tiny_compare
    rows = [json.loads(line) for line in open(out / "frontier.jsonl")]
    root = ElementTree.parse(out / "frontier.svg").getroot()
    kl_of, reward_of = svg_axis(root, "kl"), svg_axis(root, "reward")
    colours = {}
    lines = [line for line in root.iter(SVG + "polyline")]
    expected = irepo.points_by_seed(rows)
    assert sorted((line.get("data-curve"), int(line.get("data-seed"))) for line in lines) == sorted(
        expected)
    for line in lines:
        drawn = [(kl_of(float(x)), reward_of(float(y)))
                 for x, y in (pair.split(",") for pair in line.get("points").split())]
        frontier = irepo.frontier_line(expected[line.get("data-curve"), int(line.get("data-seed"))])
        assert sum(drawn, ()) == pytest.approx(sum(frontier, ()), abs=1e-3)  # flattened
        colours.setdefault(line.get("data-curve"), set()).add(line.get("stroke"))
    levels = irepo.matched_levels(rows)
    markers = [circle for circle in root.iter(SVG + "circle") if circle.get("data-kl")]
    curves = {row["curve"] for row in rows}
    assert len(markers) == len(curves) * len(levels)
    for marker in markers:
        curve, level = marker.get("data-curve"), float(marker.get("data-kl"))
        assert any(level == pytest.approx(candidate) for candidate in levels)
        seeds = [irepo.interpolate(frontier, level) for (seed_curve, _), frontier in
                 ((key, irepo.frontier_line(points)) for key, points in expected.items())
                 if seed_curve == curve]
        mean, std = float(torch.tensor(seeds).mean()), float(torch.tensor(seeds).std())
        assert reward_of(float(marker.get("cy"))) == pytest.approx(mean, abs=1e-3)
        side_by_side = kl_of(12) - kl_of(0)  # the dots at one level sit within 10 px of it
        assert kl_of(float(marker.get("cx"))) == pytest.approx(level, abs=side_by_side)
        bar = [line for line in root.iter(SVG + "line") if line.get("x1") == marker.get("cx")
               and line.get("stroke") == marker.get("fill")]  # the error bar, +- 1 std
        assert len(bar) == 1 and sorted(reward_of(float(bar[0].get(end))) for end in ("y1", "y2")
                                        ) == pytest.approx([mean - std, mean + std], abs=1e-3)
        assert f"{level:>6.2f} " in printed and f"{mean:.2f} +- {std:.2f}" in printed
        colours[curve].add(marker.get("fill"))
    assert all(len(colour) == 1 for colour in colours.values())  # one colour per curve ...
    assert len(set().union(*colours.values())) == len(curves)  # ... and a different one each
    legend = {text.get("data-curve") for text in root.iter(SVG + "text") if text.get("data-curve")}
    assert legend == curves


def test_frontier_svg_frames_negative_kl_and_a_single_point():
    """A negative KL estimate is drawn inside the frame (the KL axis reaches down to it), and a
    curve whose every point has one KL and one reward still draws (two ticks at least)."""
    import xml.etree.ElementTree as ElementTree
    curves = {"irepo": ("irepo", "zermelo", (1.0,))}
    for kls in ([-0.2, 0.5, 1.0], [0.3, 0.3, 0.3]):
        rows = [dict(curve="irepo", seed=seed, kl_to_initial=kl, true_reward=1.0 + kl)
                for seed in range(2) for kl in kls]
        table = irepo.matched_rewards(rows, irepo.matched_levels(rows))
        root = ElementTree.fromstring(irepo.frontier_svg(rows, table, curves, "title"))
        ticks = [float(text.get("data-tick-kl")) for text in root.iter(SVG + "text")
                 if text.get("data-tick-kl")]
        assert len(ticks) >= 2 and ticks[0] <= min(kls) and ticks[-1] >= max(kls)
        for line in root.iter(SVG + "polyline"):
            for pair in line.get("points").split():
                x, y = map(float, pair.split(","))
                assert irepo.LEFT <= x <= irepo.RIGHT and irepo.TOP <= y <= irepo.BOTTOM


# ---------------------------------------------------------------------------------------------
# Real checkpoints: SFT start, end-of-turn stops, the sample batch sized to the GPU.
# ---------------------------------------------------------------------------------------------

def chatml_model_stopping_at_im_end(bias):
    """A tiny Llama whose tokenizer has '<|im_end|>' as an ordinary added token and a ChatML
    template, and whose head adds `bias` to that token's logit at every step."""
    tok = word_tokenizer(LLM_WORDS)
    tok.add_tokens(["<|im_end|>"])
    tok.chat_template = irepo.CHAT_TEMPLATES["chatml"]
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids("<|im_end|>")] = bias
    model.lm_head = head
    return model, tok


def test_generation_stops_at_the_end_of_turn_marker():
    """With ChatML, sampling stops at '<|im_end|>' (here an ordinary token the head makes likely
    at every step): every response that holds it ends with it, nothing after; the texts that
    annotators see leave it out. Without the marker (no ChatML template) the same model runs
    past it. Seeded: with P(<|im_end|>) about 0.2 a step, 20 steps without it happen to a
    response with probability about 0.01, so 'most stop early' cannot fail by chance."""
    model, tok = chatml_model_stopping_at_im_end(bias=3.0)
    marker = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [irepo.encode_prompt(tok, p) for p in irepo.tiny_prompts()[:8]]
    torch.manual_seed(0)
    responses = irepo.sample(model, tok, prompts, 4, 1.0, 20, 8, "test")
    assert len(responses) == 32
    stopped = [r for r in responses if marker in r]
    assert len(stopped) >= 28
    assert all(r.index(marker) == len(r) - 1 for r in stopped)  # the marker kept, nothing after
    assert not any("<|im_end|>" in t for t in irepo.decode(tok, responses))
    tok.chat_template = irepo.CHAT_TEMPLATES["tiny"]  # a format without the marker
    torch.manual_seed(0)
    runaway = irepo.sample(model, tok, prompts, 4, 1.0, 20, 8, "test")
    assert sum(r.count(marker) > 1 for r in runaway) >= 16  # it runs on past the marker


def test_kv_cache_and_auto_sample_batch_for_the_paper_models():
    """The KV cache of one token is 2 (K, V) x layers x KV heads x head dim x 2 bytes (bf16):
    Phi-2 2*32*32*80*2 = 327,680 B, Mistral-7B (8 KV heads) 2*32*8*128*2 = 131,072 B. With
    512 + 256 tokens and K = 4, a prompt needs 0.9375 GiB (Phi-2) or 0.375 GiB (Mistral); half
    of 80 GiB free holds 42 and 106 prompts."""
    from transformers import MistralConfig, PhiConfig
    phi = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                    num_hidden_layers=32, num_attention_heads=32)
    mistral = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8)
    assert irepo.kv_cache_bytes(phi, 1) == 327_680
    assert irepo.kv_cache_bytes(mistral, 1) == 131_072
    args = irepo.parse_args(["--model", "microsoft/phi-2"])
    assert args.sample_batch_size == "auto"
    cuda = torch.device("cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 141 * 2**30))
        for config, want in ((phi, 42), (mistral, 106)):
            model = SimpleNamespace(config=config, dtype=torch.bfloat16)
            assert irepo.sample_batch(model, args, cuda) == want
    assert irepo.sample_batch(model, args, torch.device("cpu")) == 16  # CPU: the old preset value
    assert irepo.parse_args(["--sample-batch-size", "7"]).sample_batch_size == 7


def test_sft_examples_train_on_assistant_turns_only():
    """Each assistant turn that follows a user turn is one example: the conversation before it
    in the chat template is the prompt (no loss), the turn plus the end-of-turn marker is the
    response (the loss); a system turn or a reply-less user turn makes none."""
    _, tok = chatml_model_stopping_at_im_end(bias=0.0)
    chat = [{"role": "system", "content": "the"}, {"role": "user", "content": "review the hotel"},
            {"role": "assistant", "content": "the hotel was good"},
            {"role": "user", "content": "review the car"},
            {"role": "assistant", "content": "the car was dull"}, {"role": "user", "content": "and"}]
    args = irepo.parse_args(["--max-new-tokens", "20"])
    examples = irepo.sft_examples(tok, [chat], args)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert len(examples) == 2
    for (prompt, response), upto, answer in zip(examples, (2, 4), ("the hotel was good", "the car was dull")):
        assert prompt == irepo.encode_prompt(tok, chat[:upto])
        assert response == tok(answer, add_special_tokens=False)["input_ids"] + [im_end]


def test_sft_makes_pi_0_and_is_reused(llm_dirs, tmp_path):
    """--sft FILE fine-tunes --model (the preset's LoRA, merged) into out/sft/, a loadable
    folder whose weights moved; the iterations start from it; a rerun with --overwrite and the
    same settings reuses it, and one with another SFT setting redoes it. A base model without
    --sft gets a one-line warning."""
    from transformers import AutoModelForCausalLM
    conversations = tmp_path / "chat.jsonl"
    conversations.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": "the hotel was good ."}]}) + "\n"
        for p in irepo.tiny_prompts()[:8]))
    out = tmp_path / "run"
    argv = ["--model", llm_dirs["mistral"], "--preset", "mistral-7b", "--annotators", "sim",
            "--out", str(out), "--sft", str(conversations), "--sft-lr", "1e-2", "--prompts", "tiny",
            *LLM_SMALL]
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning:" not in proc.stdout
    base = AutoModelForCausalLM.from_pretrained(llm_dirs["mistral"]).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(out / "sft").state_dict()
    assert set(sft) == set(base) and any(not torch.equal(sft[n], base[n]) for n in base)
    stamp = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    proc = cli(*argv, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not redone
    proc = cli(*argv, "--overwrite", "--sft-epochs", "2")  # another recipe: the SFT is redone
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns != stamp
    proc = cli("--model", llm_dirs["mistral"], "--preset", "mistral-7b", "--annotators", "sim",
               "--out", str(tmp_path / "base"), "--prompts", "tiny", *LLM_SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum("warning:" in line and "no chat template" in line and "--sft" in line
               for line in proc.stdout.splitlines()) == 1


def test_bad_sft_files_stop_before_any_model_is_loaded(tmp_path):
    """A missing, empty, non-UTF-8 or malformed --sft file stops with one line naming the file,
    line and field, exit 2, before --out is touched or any model loaded."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    cases = {
        "missing.jsonl": (None, "--sft {path}: cannot be read (No such file"),
        "empty.jsonl": ("\n", "--sft {path}: the file holds no conversation"),
        "latin1.jsonl": (b"\xe9t\xe9\n", "--sft {path}: not UTF-8 text"),
        "broken.jsonl": (json.dumps(good) + "\n{not json\n", "{path}:2: malformed JSON"),
        "field.jsonl": ('{"text": "hi"}\n', "{path}:1: field 'messages' must be a list"),
        "noreply.jsonl": (json.dumps({"messages": good["messages"][:1]}) + "\n",
                          "{path}:1: field 'messages' has no assistant turn after a user turn"),
    }
    assert_bad_files_stop(tmp_path, "--sft", cases)


def test_a_marker_of_several_tokens_is_cut_after_its_text():
    """When '<|im_end|>' is several tokens (a byte-level BPE, as Phi-2's base tokenizer), sample()
    asks generate() to stop at the string and keeps the shortest prefix whose text holds it:
    the response ends with the marker, nothing after. generate() is replaced by a fixed
    continuation that runs on into an invented next turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(irepo.tiny_prompts(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = irepo.CHAT_TEMPLATES["chatml"]
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1
    tail = tok("the hotel was good<|im_end|>\n<|im_start|>user\nreview the car", add_special_tokens=False)["input_ids"]
    seen = {}

    def generate(input_ids, num_return_sequences, **kwargs):
        seen.update(kwargs)
        rows = input_ids.repeat_interleave(num_return_sequences, 0)
        return torch.cat([rows, torch.tensor([tail]).expand(len(rows), -1)], 1)
    model = SimpleNamespace(device="cpu", generate=generate)
    prompt_ids = [irepo.encode_prompt(tok, "review the hotel")] * 2
    responses = irepo.sample(model, tok, prompt_ids, 2, 0.7, 40, 4, "test")
    assert seen["stop_strings"] == ["<|im_end|>"]
    # Sampling as stated: from pi_t itself at the set temperature, nothing reshaping it.
    assert seen["do_sample"] is True and seen["top_k"] == 0 and seen["top_p"] == 1.0
    assert seen["temperature"] == 0.7 and seen["max_new_tokens"] == 40
    assert seen["eos_token_id"] == [tok.eos_token_id]
    assert [tok.decode(r) for r in responses] == ["the hotel was good<|im_end|>"] * 4
    assert irepo.decode(tok, responses) == ["the hotel was good"] * 4


# ---------------------------------------------------------------------------------------------
# Many processes: torchrun with 2 CPU processes over gloo. Every launch has a timeout.
# ---------------------------------------------------------------------------------------------

def torchrun(*argv, script=None, timeout=240, popen=False):
    """`torchrun --standalone --nproc_per_node 2` on irepo.py (or a script), started by child()."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", script or os.path.join(HERE, "irepo.py"), *argv]
    return child(command, timeout, popen, PYTHONPATH=HERE)


def our_errors(stderr):
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("irepo.py: error:")]


def files_in(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if "warmup" not in p.parts)


@pytest.fixture(scope="module")
def two_processes(warm_tiny, tmp_path_factory):
    """An uninterrupted 3-iteration run of the tiny world on 2 processes, from the shared warm-up."""
    out = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(warm_tiny, out / "warmup")
    proc = torchrun(*small_run_args(out, "--iterations", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_two_processes_run_the_tiny_world(uninterrupted_out, two_processes):
    """2 processes write the same files as 1 process (models, pairs, held-out samples, metrics),
    with one metrics row per iteration and the same keys; only process 0 prints."""
    out, proc = two_processes
    assert files_in(out) == files_in(uninterrupted_out)
    rows = metrics_without_timing(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [sorted(r) for r in rows] == [sorted(r) for r in metrics_without_timing(uninterrupted_out)]
    assert "device: cpu in 2 processes" in proc.stdout
    assert proc.stdout.count("iter 1 |") == 1 and proc.stdout.count("done in") == 1
    # 24 prompts per iteration, sampled and annotated in halves, gathered in the chunk's order.
    assert_pairs_come_from_their_chunks(out, 3)


def test_two_processes_train_the_same_weights_as_one(warm_tiny, uninterrupted_out, tmp_path):
    """--pairs on a saved iteration: 2 processes, each with half of every batch of 16 and the
    gradients summed, train the same weights as 1 process (up to float rounding, rel 1e-4), with
    LoRA (compared in the saved plain models). (With full fine-tuning, GPT-2's key bias would differ: its gradient is zero but for
    rounding, which Adam scales up to steps of size lr; it has no effect on the outputs.)"""
    from transformers import AutoModelForCausalLM
    pairs = uninterrupted_out / "iteration_1" / "pairs.jsonl"
    weights = []
    for n, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        shutil.copytree(warm_tiny, out / "warmup")
        argv = small_run_args(out, "--iterations", "1", "--pairs", str(pairs), "--batch-size", "16",
                              "--micro-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2")
        proc = cli(*argv) if n == 1 else torchrun(*argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights.append(AutoModelForCausalLM.from_pretrained(out / "iteration_1").state_dict())
    start = AutoModelForCausalLM.from_pretrained(warm_tiny).state_dict()
    for name, w in weights[0].items():
        assert torch.allclose(weights[1][name], w, rtol=1e-4, atol=1e-6), name
    changed = weights[0]["transformer.h.0.mlp.c_fc.weight"] - start["transformer.h.0.mlp.c_fc.weight"]
    assert changed.abs().max() > 1e-3  # the weights did move


SAME_WEIGHTS_IN_EVERY_PROCESS = '''
import sys, torch, torch.distributed as dist
import irepo
irepo.start_processes()
assert irepo.gather(irepo.shard(list(range(11)), 3), 3) == list(range(11))
folder = sys.argv[1]
irepo.build_tiny(folder, seed=0, steps=20)  # trained by both, published by process 0
assert not irepo.os.path.exists(folder + ".tmp")
args = irepo.parse_args(["--lora-rank", "4", "--lora-alpha", "8", "--batch-size", "6", "--lr", "1e-2"])
model, tok = irepo.load_policy(args, torch.device("cpu"), folder)
g = torch.Generator().manual_seed(0)
prompts = irepo.tiny_prompts()[:13]  # 13 pairs: the last batch of 1 leaves a process empty
ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
rows = [dict(prompt_ids=irepo.encode_prompt(tok, p), a_ids=ids(irepo.tiny_review(p, g)),
             b_ids=ids(irepo.tiny_review(p, g)), target_logit=1.0) for p in prompts]
ref_a, ref_b = irepo.reference_logprobs(model, rows, tok.pad_token_id, args.micro_batch_size)
torch.manual_seed(irepo.phase_seed(0, 0, "train"))
irepo.train(model, rows, ref_a, ref_b, tok.pad_token_id, args)
mine = torch.cat([p.flatten() for p in irepo.plain_state_dict(model).values()])
both = [None, None]
dist.all_gather_object(both, mine)
assert torch.equal(both[0], both[1]), "the processes hold different weights"
sys.stderr.write(f"process {dist.get_rank()}: same weights\\n")
dist.barrier()
irepo.os._exit(0)  # as irepo.py leaves: tearing gloo down can abort the exit
'''


def test_every_process_holds_the_same_weights(tmp_path):
    """The tiny warm-up is trained by both processes and published once by process 0; after an
    iteration of LoRA training (a last batch that leaves one process nothing), both processes
    hold bit-identical weights and adapters; shard() then gather() restores any list's order."""
    script = tmp_path / "same.py"
    script.write_text(SAME_WEIGHTS_IN_EVERY_PROCESS)
    proc = torchrun(str(tmp_path / "warmup"), script=str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(": same weights") == 2


def test_two_processes_killed_after_an_iteration_resume(two_processes, tmp_path):
    """torchrun stopped by SIGTERM after iteration 1 keeps its complete iterations, says once how
    to resume (with torchrun), and --resume on 2 processes ends with the same metrics as the
    uninterrupted 2-process run (each process's random streams are seeded by iteration and rank)."""
    reference, _ = two_processes
    out = tmp_path / "run"
    shutil.copytree(reference / "warmup", out / "warmup")
    argv = small_run_args(out, "--iterations", "3")
    proc = torchrun(*argv, popen=True)
    deadline = time.time() + 240
    while not (out / "iteration_1").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    done = irepo.complete_iterations(str(out))
    assert 1 <= done < 3, f"the signal did not land mid-run ({done} iterations complete)"
    assert err.count("Resume with: torchrun --nproc_per_node 2 irepo.py") == 1
    resumed = torchrun(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after iteration {done}" in resumed.stdout
    assert metrics_without_timing(out) == metrics_without_timing(reference)


def test_two_processes_stop_together_with_one_line(warm_tiny, two_processes, tmp_path):
    """A bad input, met by both processes, is reported once and stops both; so is the refusal to
    write into another run's --out (checked by process 0 alone), and a failure in training (a
    learning rate that makes the gradient non-finite). Nothing hangs (every launch has a timeout)."""
    tic = time.time()
    proc = torchrun("--eval-prompts", "1000", "--out", str(tmp_path / "a"), timeout=120)
    assert proc.returncode != 0 and len(our_errors(proc.stderr)) == 1, proc.stderr[-3000:]
    assert "--eval-prompts 1000: only 640 prompts exist" in our_errors(proc.stderr)[0]
    taken, _ = two_processes
    proc = torchrun(*small_run_args(taken, "--iterations", "3"), timeout=120)
    assert proc.returncode != 0 and len(our_errors(proc.stderr)) == 1, proc.stderr[-3000:]
    assert f"--out {taken} already holds a run (3 complete iterations)" in our_errors(proc.stderr)[0]
    out = tmp_path / "b"
    shutil.copytree(warm_tiny, out / "warmup")
    proc = torchrun(*small_run_args(out, "--lr", "1e30"), timeout=120)
    assert proc.returncode != 0 and len(our_errors(proc.stderr)) == 1, proc.stderr[-3000:]
    assert "became non-finite" in our_errors(proc.stderr)[0]
    assert not list(out.glob("iteration_*")) and time.time() - tic < 150


# ---------------------------------------------------------------------------------------------
# The file itself: the rules that keep it readable.
# ---------------------------------------------------------------------------------------------

def test_the_file_keeps_its_rules():
    """The rules that replaced the line cap (STYLE.md, principles 1 and 12): Part I, the method,
    at most 600 lines from its banner to Part II's, and before any command-line or file-writing
    code; the loss within the
    first 400 lines; no function over 50 non-blank lines (the loop at most 60); no line over 100
    characters; no lambda bound to a name; the whole file at most 2,300 lines."""
    import ast
    with open(os.path.join(HERE, "irepo.py")) as f:
        source = f.read()
    lines = source.splitlines()
    part_one = next(i for i, line in enumerate(lines) if line.startswith("# PART I."))
    part_two = next(i for i, line in enumerate(lines) if line.startswith("# PART II"))
    assert part_two - part_one <= 600 and len(lines) <= 2300  # Part I: banner to banner
    assert next(i for i, line in enumerate(lines) if line.startswith("def irepo_loss")) < 400
    assert next(i for i, line in enumerate(lines) if "argparse" in line) > part_two
    assert next(i for i, line in enumerate(lines) if "os.replace(" in line) > part_two
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            body = [line for line in lines[node.lineno - 1:node.end_lineno] if line.strip()]
            assert len(body) <= 50, (node.name, len(body))
        if isinstance(node, ast.Assign):
            assert not isinstance(node.value, ast.Lambda), node.lineno
    run = next(node for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert len([line for line in lines[run.lineno - 1:run.end_lineno] if line.strip()]) <= 60


# ---------------------------------------------------------------------------------------------
# The run's numbers, pinned: each test names the silent bug it catches.
# ---------------------------------------------------------------------------------------------

def review_pairs(tokenizer, count, seed=0):
    """`count` pairs of random tiny reviews of built-in prompts, tokenized as the loop does,
    with targets of both signs and several sizes."""
    generator = torch.Generator().manual_seed(seed)

    def response_ids(prompt):
        text = irepo.tiny_review(prompt, generator)
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = []
    for i, prompt in enumerate(irepo.tiny_prompts()[::7][:count]):
        target = (1.0 + i % 3) * (1 if i % 2 == 0 else -1)
        rows.append(dict(prompt_ids=irepo.encode_prompt(tokenizer, prompt),
                         a_ids=response_ids(prompt), b_ids=response_ids(prompt),
                         target_logit=target))
    return rows


def recording_loss(monkeypatch, seen):
    """Replace the irepo loss by itself, recording h = beta * (logratio_a - logratio_b)."""
    original = irepo.LOSSES["irepo"]

    def loss(logratio_a, logratio_b, target_logit, beta):
        seen.append((beta * (logratio_a - logratio_b)).detach())
        return original(logratio_a, logratio_b, target_logit, beta)
    monkeypatch.setitem(irepo.LOSSES, "irepo", loss)


def test_at_learning_rate_zero_h_is_zero_and_the_loss_is_target_squared(warm_tiny, monkeypatch):
    """Silent bug caught: a reference that is not pi_t, e.g. response b's log-ratio taken against
    response a's reference. At learning rate 0 the policy stays pi_t, so every implicit reward
    difference h is 0 (up to float rounding between two batch layouts) and every irepo loss
    equals target^2."""
    args = irepo.parse_args(["--epochs", "2", "--batch-size", "4", "--micro-batch-size", "4"])
    args.lr = 0.0  # the command line refuses 0; the function takes it
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), warm_tiny)
    rows = review_pairs(tokenizer, 8)
    reference_a, reference_b = irepo.reference_logprobs(model, rows, tokenizer.pad_token_id, 4)
    seen = []
    recording_loss(monkeypatch, seen)
    torch.manual_seed(0)
    fitted, _ = irepo.train(model, rows, reference_a, reference_b, tokenizer.pad_token_id, args)
    h = torch.cat(seen)
    assert len(h) == 2 * len(rows) and h.abs().max() < 1e-5, h
    targets = torch.tensor([row["target_logit"] for row in rows])
    assert fitted["loss"] == pytest.approx(float((targets ** 2).mean()), abs=1e-4)
    assert fitted["regression_mse"] == pytest.approx(float((targets ** 2).mean()), abs=1e-4)


def test_diagnostics_at_beta_one_half_are_hand_computed(warm_tiny):
    """Silent bug caught: the per-pair beta * h behind reward_margin, regression_mse and
    sign_agreement computed without its beta (the other tests of them run at beta = 1). At
    learning rate 0 and beta = 0.5, with each pair's references lowered by known offsets, the
    log-ratios are those offsets: h = offset_a - offset_b, beta * h = (1, -2, 3, 1, -2, -3, 1, 2)
    against targets (1, -2, 3, -1, 2, -3, 1, -2), so reward_margin = mean beta * h = 1/8,
    regression_mse = (4 + 16 + 16) / 8 = 4.5 (the loss too) and sign_agreement = 5/8. Without
    beta they would read 1/4, 105/8 and 5/8."""
    args = irepo.parse_args(["--beta", "0.5", "--epochs", "1", "--batch-size", "4",
                             "--micro-batch-size", "4"])
    args.lr = 0.0  # the command line refuses 0; the function takes it
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), warm_tiny)
    rows = review_pairs(tokenizer, 8)
    targets = [row["target_logit"] for row in rows]
    assert targets == [1.0, -2.0, 3.0, -1.0, 2.0, -3.0, 1.0, -2.0]
    offset_a = torch.tensor([1.0, -3.0, 4.0, 1.0, -1.0, -2.0, 0.0, 3.0])
    offset_b = torch.tensor([-1.0, 1.0, -2.0, -1.0, 3.0, 4.0, -2.0, -1.0])
    assert (0.5 * (offset_a - offset_b)).tolist() == [1.0, -2.0, 3.0, 1.0, -2.0, -3.0, 1.0, 2.0]
    reference_a, reference_b = irepo.reference_logprobs(model, rows, tokenizer.pad_token_id, 4)
    torch.manual_seed(0)
    fitted, _ = irepo.train(model, rows, reference_a - offset_a, reference_b - offset_b,
                            tokenizer.pad_token_id, args)
    assert fitted["reward_margin"] == pytest.approx(1 / 8, abs=1e-4)
    assert fitted["regression_mse"] == pytest.approx(4.5, abs=1e-4)
    assert fitted["loss"] == pytest.approx(4.5, abs=1e-4)
    assert fitted["sign_agreement"] == 5 / 8


def test_training_fits_a_handful_of_pairs(warm_tiny):
    """Silent bug caught: a policy that is its own reference (h = 0 whatever it learns), or a
    learning rate that never leaves 0. On 8 fixed pairs and 40 epochs the regression fits:
    its MSE falls below a tenth of mean(target^2) (the MSE of h = 0), every sign agrees, and the
    weights moved."""
    args = irepo.parse_args(["--epochs", "40", "--batch-size", "8", "--micro-batch-size", "8",
                             "--lr", "1e-3"])
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), warm_tiny)
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    rows = review_pairs(tokenizer, 8)
    reference_a, reference_b = irepo.reference_logprobs(model, rows, tokenizer.pad_token_id, 8)
    torch.manual_seed(0)
    fitted, _ = irepo.train(model, rows, reference_a, reference_b, tokenizer.pad_token_id, args)
    targets = torch.tensor([row["target_logit"] for row in rows])
    assert fitted["regression_mse"] < 0.1 * float((targets ** 2).mean()), fitted
    assert fitted["sign_agreement"] == 1.0
    moved = [name for name, weight in model.state_dict().items()
             if not torch.equal(weight, before[name])]
    assert len(moved) > len(before) // 2


def test_learning_rates_follow_cosine_with_warm_up(monkeypatch):
    """Silent bug caught: a schedule that is never stepped (with warm-up its learning rate stays
    0). The learning rate that Adam sees at each of the 30 steps is lr * k / w during the w = 3
    warm-up steps, then lr * (1 + cos(pi * (k - w) / (30 - w))) / 2."""
    seen = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    weight = torch.nn.Parameter(torch.ones(3))
    settings = irepo.Training(lr=0.01, epochs=3, batch_size=4, micro_batch_size=2,
                              warmup_ratio=0.1)
    irepo.fit([weight], 40, lambda indices, epoch: (weight ** 2).sum() * len(indices), settings,
              "test")
    steps, warm = 30, 3
    expected = [0.01 * k / warm if k < warm
                else 0.01 * (1 + math.cos(math.pi * (k - warm) / (steps - warm))) / 2
                for k in range(steps)]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_the_tiny_warm_up_writes_the_toy_language(warm_tiny):
    """Silent bug caught: a warm-up that trains nothing (every run-based test would then start
    from an untrained model). Sampled at temperature 1, pi_0 writes well-formed reviews ('the
    <topic> was <adjective> [and the <aspect> was <adjective>]* .') of the prompt's topic: 95%
    and 84% of 128 seeded samples here, against 0% for the untrained model."""
    import re
    args = irepo.parse_args([])
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), warm_tiny)
    prompts = irepo.tiny_prompts()[::20][:32]
    torch.manual_seed(0)
    responses = irepo.sample(model, tokenizer, [irepo.encode_prompt(tokenizer, prompt)
                                                for prompt in prompts], 4, 1.0, 20, 32, "test")
    adjectives = "|".join(irepo.POSITIVE + irepo.NEGATIVE + irepo.NEUTRAL)
    review = re.compile(rf"the (\w+) was ({adjectives})"
                        rf"( and the ({'|'.join(irepo.ASPECTS)}) was ({adjectives}))* \.")
    matches = [review.fullmatch(text) for text in irepo.decode(tokenizer, responses)]
    topics = [prompt.split()[-1] for prompt in prompts for _ in range(4)]
    assert sum(bool(match) for match in matches) >= 0.85 * len(matches)
    on_topic = sum(bool(match) and match.group(1) == topic
                   for match, topic in zip(matches, topics))
    assert on_topic >= 0.7 * len(matches)


def held_out_prompt_ids(out, tokenizer, *extra):
    """The held-out prompts of a small run in `out` (as split_prompts makes them), encoded."""
    args = irepo.parse_args(small_run_args(out, *extra))
    held_out, _ = irepo.split_prompts(irepo.tiny_prompts(), args)
    return [irepo.encode_prompt(tokenizer, prompt) for prompt in held_out
            for _ in range(args.eval_samples)]


def test_kl_metrics_recomputed_from_the_saved_files(uninterrupted_out):
    """Silent bug caught: a KL with its sign flipped, taken against the wrong samples or under
    the wrong model. kl_to_reference of iteration t is the mean of log pi_{t-1} - log pi_t over
    pi_{t-1}'s held-out samples (initial_eval.json for t = 1, else iteration_{t-1}/eval.json),
    and kl_to_initial the same over pi_0's; each eval.json holds pi_t's own log-probs. All
    recomputed from the saved files and models, to 1e-4; and pi_3 is not pi_0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = uninterrupted_out
    tokenizer = AutoTokenizer.from_pretrained(out / "iteration_1")
    prompt_ids = held_out_prompt_ids(out, tokenizer, "--iterations", "3")
    saved = {0: json.loads((out / "initial_eval.json").read_text())}
    rows = metrics_without_timing(out)
    for t in (1, 2, 3):
        saved[t] = json.loads((out / f"iteration_{t}" / "eval.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out / f"iteration_{t}").eval()

        def log_ratios(samples):  # log p - log pi_t over p's samples
            logps = irepo.batched_logprobs(model, prompt_ids, samples["responses"], 0, 16)
            return torch.tensor(samples["logps"]) - logps

        def kl_from(samples):
            return float(log_ratios(samples).mean())
        assert rows[t - 1]["kl_to_reference"] == pytest.approx(kl_from(saved[t - 1]), abs=1e-4)
        assert rows[t - 1]["kl_to_initial"] == pytest.approx(kl_from(saved[0]), abs=1e-4)
        assert kl_from(saved[t]) == pytest.approx(0.0, abs=1e-4)  # its own log-probs
    # pi_3 moved away from pi_0 (a KL of 16 samples can be below 0 even so; its terms cannot)
    assert log_ratios(saved[0]).abs().mean() > 0.02


class RewardOrder:
    """A deterministic annotator: 1 if a has the higher hidden reward, 0 if b has, 1/2 if tied."""

    def compare(self, prompts, texts_a, texts_b):
        difference = irepo.hidden_rewards(texts_a) - irepo.hidden_rewards(texts_b)
        return ((torch.sign(difference) + 1) / 2)[:, None]

    def reward(self, texts):
        return irepo.hidden_rewards(texts)


def test_win_rate_recomputed_with_a_deterministic_panel(warm_tiny, tmp_path, monkeypatch):
    """Silent bug caught: the win-rate's arguments reversed (pi_0 measured against pi_t). With
    a deterministic panel, the win-rate of iteration 1 is recomputed from the saved held-out
    samples of pi_1 (first) and pi_0 (second); reversed, it would read 1 minus that."""
    from transformers import AutoTokenizer
    monkeypatch.setattr(irepo, "build_panel", lambda args, device, batch_size: irepo.Panel(
        [RewardOrder()], torch.Generator()))
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--lr", "1e-3")
    tokenizer = AutoTokenizer.from_pretrained(out / "iteration_1")
    initial = json.loads((out / "initial_eval.json").read_text())["responses"]
    current = json.loads((out / "iteration_1" / "eval.json").read_text())["responses"]
    texts_initial, texts_current = irepo.decode(tokenizer, initial), irepo.decode(tokenizer, current)
    expected = float(RewardOrder().compare(None, texts_current, texts_initial).mean())
    assert expected != 0.5  # otherwise a reversal could not show
    assert rows[0]["win_rate_vs_initial"] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["true_reward"] == pytest.approx(
        float(irepo.hidden_rewards(texts_current).mean()), abs=1e-6)


@pytest.mark.parametrize("initial_text,win_rate", [("awful " * 12, 1.0), ("great " * 12, 0.0)])
def test_win_rate_direction(warm_tiny, initial_text, win_rate):
    """Silent bug caught: a win-rate of pi_0 against pi_t. When pi_0's held-out texts are the
    worst possible (12 negative words; pi_t writes at most a few), a panel that prefers the
    higher reward gives pi_t a win-rate of 1; when they are the best possible, 0."""
    args = irepo.parse_args(["--eval-samples", "1"])
    model, tokenizer = irepo.load_policy(args, torch.device("cpu"), warm_tiny)
    prompts = irepo.tiny_prompts()[:16]
    held_out = irepo.HeldOut(prompts, [irepo.encode_prompt(tokenizer, p) for p in prompts])
    torch.manual_seed(0)
    held_out.initial = irepo.held_out_samples(model, tokenizer, held_out, args, 16, "test")
    held_out.initial.texts = [initial_text.strip()] * len(prompts)
    panel = irepo.Panel([RewardOrder()], torch.Generator())
    metrics, _ = irepo.evaluate(model, tokenizer, panel, held_out, held_out.initial, 0, args, 16)
    assert metrics["win_rate_vs_initial"] == win_rate


def test_every_random_stream_is_distinct(monkeypatch):
    """Silent bug caught: two phases, iterations or processes drawing the same random numbers
    (e.g. annotation votes correlated with sampling). The seeds of every (phase, iteration,
    process) are distinct for 50 iterations and 8 processes; training's alone is the same in
    every process, by design (all shuffle the pairs alike)."""
    for seed in (0, 1, 12345):
        seeds = {}
        for rank in range(8):
            monkeypatch.setattr(irepo, "RANK", rank)
            for t in range(50):
                for phase in irepo.PHASES:
                    key = (phase, t, 0 if phase == "train" else rank)
                    seeds.setdefault(irepo.phase_seed(seed, t, phase), set()).add(key)
        assert all(len(keys) == 1 for keys in seeds.values())
        assert len(seeds) == 50 * ((len(irepo.PHASES) - 1) * 8 + 1)


# ---------------------------------------------------------------------------------------------
# Which soft label: the Zermelo fit, the pair's own votes, fresh votes; ties.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("votes", [0, 3, 4, 6, 8])
def test_zermelo_label_of_two_responses_is_the_smoothed_vote_share(votes):
    """With K = 2 the Zermelo fit, with `smoothing` pseudo-votes per ordered pair, gives the
    smoothed vote share itself: sigma(s_0 - s_1) = (v + 0.5) / (8 + 1), e.g. 6.5 / 9 for 6 of 8
    votes (by hand: the fixed point is gamma_0 / gamma_1 = (v + 0.5) / (8 - v + 0.5))."""
    wins = torch.tensor([[0.0, votes], [8.0 - votes, 0.0]])
    scores, best, worst = irepo.rank_responses(wins, 0.5)
    p_hat = torch.sigmoid(scores[best] - scores[worst])
    assert float(p_hat) == pytest.approx((max(votes, 8 - votes) + 0.5) / 9, abs=1e-6)
    assert int(best) != int(worst)


class EvenPanel:
    """Annotators who do not care: half of the N = 4 vote for a, half for b, on every pair."""

    def compare(self, prompts, texts_a, texts_b, group=1):
        return torch.tensor([[1.0, 0.0, 1.0, 0.0]] * len(prompts))


@pytest.mark.parametrize("label", ["zermelo", "votes"])
def test_a_tie_is_still_a_pair_and_only_irepo_learns_from_it(label):
    """When all K scores tie, the best and the worst are two different responses and p_hat is
    1/2 (target 0): iREPO keeps the pair; DPO and IPO, which need a majority, skip it and count
    it in tied_pairs (not in skipped_pairs)."""
    texts = ["w", "x", "y", "z"]
    labels = irepo.annotate(EvenPanel(), ["p"], texts, 4, 0.5, label)
    assert labels[0]["best"] != labels[0]["worst"]
    assert labels[0]["p_hat"] == pytest.approx(0.5, abs=1e-6)
    rows = [dict(labels[0]), dict(labels[0], target_logit=1.0)]
    assert irepo.without_ties(rows, "irepo") == (rows, 0)
    assert irepo.without_ties(rows, "soft-dpo") == (rows, 0)  # a soft label too
    for loss in ("dpo", "ipo"):
        kept, tied = irepo.without_ties(rows, loss)
        assert kept == rows[1:] and tied == 1


def test_annotators_who_do_not_care_yield_pairs_with_p_hat_one_half(warm_tiny, tmp_path):
    """--num-responses 2 --annotators sim:2 --sharpness 0: the two votes split half the time.
    Those pairs are kept with p_hat = 1/2 instead of being dropped as degenerate, so nearly every
    prompt yields a pair (only identical or empty responses are skipped)."""
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--num-responses", "2",
                           "--annotators", "sim:2", "--sharpness", "0")
    pairs = saved_pairs(out)
    assert rows[0]["pairs"] >= 20 and rows[0]["tied_pairs"] == 0  # of 24 prompts
    assert sum(pair["p_hat"] == pytest.approx(0.5, abs=1e-6) for pair in pairs) >= 4


@pytest.mark.parametrize("label,low,high", [("fresh", -0.3, 0.3), ("votes", 0.4, 1.2)])
def test_fresh_votes_remove_the_winners_curse(warm_tiny, tmp_path, label, low, high):
    """With --sharpness 0 every true preference is 1/2 (target 0). Fresh votes on the chosen
    pair give a mean target logit near 0 over 192 prompts; the votes that chose the pair give
    about +0.7. Seeded; by chance: each fresh target has mean 0 and sd about 0.75, so the mean
    of ~190 has sd about 0.055 and 0.3 is over 5 sd away; the curse's +0.7 lies over 5 sd
    inside its own interval (0.4, 1.2)."""
    out = tmp_path / "run"
    rows = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--epochs", "1",
                           "--prompts-per-iteration", "192", "--sharpness", "0",
                           "--label", label)
    assert rows[0]["pairs"] > 150 and rows[0]["label"] == label
    assert low < rows[0]["target_logit_mean"] < high
    assert all(pair["label"] == label for pair in saved_pairs(out))


def test_fresh_votes_resume_bit_identical(warm_tiny, tmp_path):
    """Fresh votes come from a stream of their own, seeded by (seed, iteration): a run resumed
    after its first iteration draws the very same votes, and ends with the same metrics, as an
    uninterrupted one."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    rows = run_with_warmup(warm_tiny, str(whole), "--label", "fresh")
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "iteration_2")
    irepo.main(small_run_args(cut, "--label", "fresh", "--resume"))
    assert metrics_without_timing(cut) == metrics_without_timing(whole)
    assert (cut / "iteration_2" / "pairs.jsonl").read_text() == \
        (whole / "iteration_2" / "pairs.jsonl").read_text()
    assert len(rows) == 2


def test_theory_labels_show_the_winners_curse_and_the_pooling():
    """Claim 5, on 4,000 seeded prompts with K = 4 and N = 8: in the null world the labels that
    reuse the ranking's votes invent a preference (bias above +0.5 in logit) and fresh votes do
    not (|bias| < 0.1); in the Bradley-Terry world the Zermelo fit has the smallest rmse. The
    standard error of a bias over 4,000 prompts is about 0.012, so none of these is chance."""
    table = irepo.theory_labels(ks=(4,), ns=(8,))
    null, _ = table["null", 4, 8]
    real, _ = table["bradley-terry", 4, 8]
    assert null["votes"][0] > 0.5 and null["zermelo"][0] > 0.5 and abs(null["fresh"][0]) < 0.1
    assert real["zermelo"][1] < 0.8 * min(real["votes"][1], real["fresh"][1])


def test_soft_dpo_hand_computed_and_its_minimizer():
    """DPO's cross-entropy on the soft label: -p log sigma(h) - (1 - p) log sigma(-h), e.g. with
    h = 0.5 * (2 - 0) = 1 and p_hat = sigma(0) = 1/2: log(1 + e^-1)/2 + log(1 + e)/2 = 0.8133.
    With exact preferences its minimizer is iREPO's pi* (the tabular check of --theory)."""
    got = irepo.soft_dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert float(got) == pytest.approx(expected, abs=1e-6)
    soft = irepo.theory_optimality(schemes=("uniform",), loss_fn=irepo.soft_dpo_loss)
    assert max(soft.values()) < 1e-5


# ---------------------------------------------------------------------------------------------
# LoRA always trains: alpha defaults to the rank; a preset's targets fit any architecture.
# ---------------------------------------------------------------------------------------------

def test_lora_rank_alone_trains_in_the_tiny_preset(warm_tiny, tmp_path, capsys):
    """Silent bug caught: --lora-rank N without --lora-alpha scaled the adapters by 0 / N in the
    tiny preset, so nothing trained. Now alpha defaults to the rank, the start says how many
    layers got adapters, and the weights of iteration 1 differ from the warm-up's."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--lora-rank", "4", "--lr", "1e-3")
    printed = capsys.readouterr().out
    assert "lora_alpha=4.0" in printed
    assert "LoRA: rank 4, alpha 4, adapters on 8 linear layers (c_attn,c_fc,c_proj)" in printed
    before = AutoModelForCausalLM.from_pretrained(out / "warmup").state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "iteration_1").state_dict()
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("mlp.c_fc" in name for name in moved) and any("attn.c_attn" in name for name in moved)


def test_lora_resume_rebuilds_the_exact_bf16_policy(warm_tiny, tmp_path, monkeypatch):
    """With bf16 weights and LoRA, iteration_1/ holds adapters.pt beside its plain model, whose
    rounded weights are not the trained policy; --resume rebuilds the policy from the base model
    and adapters.pt, so a resumed iteration 2 has the uninterrupted run's metrics, bit for bit."""
    monkeypatch.setitem(irepo.DTYPE, "cpu", torch.bfloat16)
    out = tmp_path / "run"
    flags = ("--lora-rank", "4", "--lr", "3e-3", "--epochs", "1", "--prompts-per-iteration", "8",
             "--eval-prompts", "8", "--max-new-tokens", "10")
    run_with_warmup(warm_tiny, str(out), *flags)
    uninterrupted = metrics_without_timing(out)
    shutil.rmtree(out / "iteration_2")
    run_with_warmup(warm_tiny, str(out), *flags, "--resume")
    assert metrics_without_timing(out) == uninterrupted
    adapters = torch.load(out / "iteration_1" / "adapters.pt", weights_only=True)
    assert len(adapters) == 8 and all(len(frozen) == 1 for frozen in adapters.values())
    args = irepo.parse_args(small_run_args(out, *flags))
    exact, tokenizer = irepo.load_exact(args, torch.device("cpu"), str(out / "iteration_1"))
    plain, _ = irepo.load_policy(args, torch.device("cpu"), str(out / "iteration_1"))
    held_out = json.loads((out / "iteration_1" / "eval.json").read_text())["responses"]
    prompt_ids = [irepo.encode_prompt(tokenizer, "The food was")] * len(held_out)
    logps = [irepo.batched_logprobs(model, prompt_ids, held_out, 0, 16) for model in (exact, plain)]
    assert not torch.equal(*logps)  # bf16 rounding: the plain copy is not the trained policy


def test_a_preset_made_for_another_model_adapts_every_linear_layer():
    """Silent bug caught: on Llama (or Qwen2, Gemma), Phi-2's target names matched only q, k and
    v, leaving the attention output and the MLP unadapted. When the model lacks any of the
    preset's names, every linear layer but the output head gets an adapter, and a step moves the
    MLP's weights; names given with --lora-targets are taken as they are."""
    model = tiny_causal_lm("llama", 20)
    args = irepo.parse_args(["--model", "some/llama"])  # an unknown name: Phi-2's preset
    assert args.preset == "phi-2" and irepo.preset_targets(args)
    layers = irepo.lora_layers(model, args.lora_targets, irepo.preset_targets(args))
    names = {name.split(".")[-1] for name in layers}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in layers and len(layers) == 2 * 7
    given = irepo.parse_args(["--model", "some/llama", "--lora-targets", "q_proj,dense"])
    assert not irepo.preset_targets(given)
    assert {name.split(".")[-1] for name in irepo.lora_layers(model, given.lora_targets)} == {"q_proj"}
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    settings = irepo.training(args, 1e-2, 1)
    ids = torch.randint(3, 20, (4, 6), generator=torch.Generator().manual_seed(0))

    def micro_loss(indices, epoch):
        batch = irepo.collate([[1, 2]] * len(indices), ids[indices].tolist(), 0, "cpu")
        return -irepo.sequence_logprobs(model, *batch).sum()
    with irepo.trainable(model, settings) as params:
        irepo.fit(params, 4, micro_loss, settings, "test")
    after = irepo.plain_state_dict(model)
    assert set(after) == set(before)  # saved as a plain model
    for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"):
        assert not torch.equal(after[f"model.layers.0.{part}.weight"],
                               before[f"model.layers.0.{part}.weight"]), part


# ---------------------------------------------------------------------------------------------
# KL that is KL at any temperature; independent evaluation streams.
# ---------------------------------------------------------------------------------------------

def enumerable_policy(seed, scale):
    """A GPT-2 over 5 tokens whose logits are scaled up (peaked distributions), with a word-level
    tokenizer in the tiny chat format: small enough to enumerate every response of 2 tokens."""
    tokenizer = word_tokenizer(["x", "y"])
    tokenizer.chat_template = irepo.CHAT_TEMPLATES["tiny"]
    model = tiny_causal_lm("gpt2", len(tokenizer), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # tied with the input embeddings: a sharper policy
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def exact_kl(p_model, q_model, prompt_ids, eos):
    """KL(p || q) over every response of at most 2 new tokens (it ends at EOS or at 2 tokens),
    by enumeration, with the same scorer the run uses."""
    vocabulary = range(p_model.config.vocab_size)
    responses = [[eos]] + [[first, second] for first in vocabulary if first != eos
                           for second in vocabulary]
    log_p = irepo.batched_logprobs(p_model, [prompt_ids] * len(responses), responses, 0, 64)
    log_q = irepo.batched_logprobs(q_model, [prompt_ids] * len(responses), responses, 0, 64)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-5)  # the enumeration is whole
    return float((log_p.exp() * (log_p - log_q)).sum())


def test_kl_is_estimated_from_temperature_one_samples():
    """Silent bug caught: KL columns averaged over samples drawn at the sampling temperature
    (0.7 in the LLM presets), which are not samples of pi_t. At temperature 0.5, the held-out
    KL samples are drawn at temperature 1, and the estimate of KL(pi || pi') over 3,000 of them
    matches the exact KL (0.105, enumerated over all responses of 2 tokens) within 0.035; the
    mean over the tempered samples is off by more than 0.2 (here it is even negative). Seeded;
    the estimates' standard errors are below 0.01, so neither comparison is chance."""
    policy, tokenizer = enumerable_policy(3, 3.0)
    other, _ = enumerable_policy(4, 3.0)
    prompt_ids = irepo.encode_prompt(tokenizer, "x")
    held_out = irepo.HeldOut(["x"] * 3000, [prompt_ids] * 3000)
    args = irepo.parse_args(["--temperature", "0.5", "--max-new-tokens", "2"])
    torch.manual_seed(0)
    samples = irepo.held_out_samples(policy, tokenizer, held_out, args, 3000, "test")
    exact = exact_kl(policy, other, prompt_ids, tokenizer.eos_token_id)

    def estimate(responses):
        log_p = irepo.batched_logprobs(policy, held_out.prompt_ids, responses, 0, 3000)
        log_q = irepo.batched_logprobs(other, held_out.prompt_ids, responses, 0, 3000)
        return float((log_p - log_q).mean())
    assert samples.kl_responses is not samples.responses
    assert estimate(samples.kl_responses) == pytest.approx(exact, abs=0.035)
    assert abs(estimate(samples.responses) - exact) > 0.2
    assert exact > 0.05


def test_a_unanimous_panel_of_many_gives_finite_large_targets(warm_tiny, tmp_path):
    """32 sharp simulated annotators (sharpness 10), K = 8, smoothing 0.1: where the votes are
    one-sided the Zermelo gap exceeds 16.6, beyond which sigma(gap) rounds to 1 in float32 and a
    logit taken through p_hat is infinite. The label is s_best - s_worst itself: finite, and
    the loss too."""
    out = tmp_path / "run"
    metrics = run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--num-annotators", "32",
                              "--sharpness", "10", "--num-responses", "8", "--smoothing", "0.1")
    targets = [row["target_logit"] for row in saved_pairs(out)]
    assert all(math.isfinite(target) for target in targets) and max(targets) > 16.6
    assert math.isfinite(metrics[0]["loss"]) and math.isfinite(metrics[0]["regression_mse"])


def test_pi_1_is_not_sampled_with_pi_0s_stream(warm_tiny, tmp_path, monkeypatch):
    """Silent bug caught: pi_0's held-out samples and pi_1's first ones drawn from the same seed,
    so that a pi_1 close to pi_0 repeats pi_0's very texts and the win-rate reads 1/2 by
    construction. pi_0's draw has a stream of its own: at learning rate 1e-9 (pi_1 = pi_0 but
    for rounding) most of pi_1's held-out responses differ from pi_0's. And no seed serves two
    streams (e.g. the evaluation's samples and its votes): no (iteration, phase) is asked twice."""
    asked = []
    seed_of = irepo.phase_seed

    def recording_seed(*key):  # (seed, iteration, phase)
        asked.append(key)
        return seed_of(*key)
    monkeypatch.setattr(irepo, "phase_seed", recording_seed)
    out = tmp_path / "run"
    run_with_warmup(warm_tiny, str(out), "--iterations", "1", "--lr", "1e-9")
    assert len(asked) == len(set(asked)) and {key[2] for key in asked} >= {"eval", "eval_votes"}
    initial = json.loads((out / "initial_eval.json").read_text())["responses"]
    current = json.loads((out / "iteration_1" / "eval.json").read_text())["responses"]
    same = sum(first == second for first, second in zip(initial, current))
    assert same < len(initial) / 2, same


# ---------------------------------------------------------------------------------------------
# The GPU check's arithmetic, on a CPU: the FLOPs it counts are those of the time it divides by.
# ---------------------------------------------------------------------------------------------

def gpu_check():
    """.ci/gpu_check.py, imported from its path next to this file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  os.path.join(HERE, ".ci", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_utilization_counts_the_training_flops_of_seconds_train():
    """Silent bug caught: the reference pass's 2N per token counted in training's FLOPs (8N for
    LoRA with checkpointing) though train_tokens_per_s is over seconds_train alone, so the share
    of peak read 4/3 too high. 1000 tokens/s x N = 1e9 on a 1e13 FLOP/s card: LoRA 6N with
    checkpointing (0.6), 4N without (0.4); every weight trained 8N with (0.8), 6N without
    (0.6); the reference pass's seconds change nothing; no known peak, no figure."""
    check = gpu_check()
    row = dict(train_tokens_per_s=1000.0, seconds_train=10.0, seconds_reference=5.0)
    for checkpointing, lora, share in ((True, True, 0.6), (False, True, 0.4),
                                       (True, False, 0.8), (False, False, 0.6)):
        measured = check.utilization(row, 1e9, 1e13, gradient_checkpointing=checkpointing,
                                     lora=lora)
        assert measured == pytest.approx(share), (checkpointing, lora)
    slow_reference = dict(row, seconds_reference=500.0)
    assert check.utilization(slow_reference, 1e9, 1e13, True, True) == pytest.approx(0.6)
    assert check.utilization(row, 1e9, None, True, True) is None


def test_gpu_check_n_leaves_out_the_input_embedding_unless_it_is_the_lm_head():
    """N of the FLOP count is the parameters that multiply each token: the input embedding is a
    lookup and leaves N, unless the LM head shares its table (then it stays, once)."""
    from transformers import MistralConfig, MistralForCausalLM
    check = gpu_check()
    for tied in (False, True):
        model = MistralForCausalLM(MistralConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
        total = sum(p.numel() for p in model.parameters())
        assert check.matmul_params(model) == (total if tied else total - 50 * 16), tied
