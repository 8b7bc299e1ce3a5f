"""Transformers beyond the paper: char-gpt and vit-tiny, the text pipeline, LaPerm's rows for them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn

from laperm import LaPerm, laperm_param_groups
from laperm.analysis.rebuild import permutable_layouts
from laperm.checkpoint import load
from laperm.data import DataError
from laperm.data import text as textdata
from laperm.export import load_compact
from laperm.models import MODELS, CharGPT, build

VOCAB = 104  # the default corpus: 103 characters of the training split + <unk>


def test_parameter_counts_under_one_million():
    gpt = build("char-gpt", seed=0, vocab_size=VOCAB)
    # 4 blocks of (qkv 128*384+384, proj 128*128+128, MLP 128*512+512+512*128+128, 2 LayerNorms 2*256),
    # token table 104*128, positions 128*128, final LayerNorm 256; the output layer is the token table.
    block = 128 * 384 + 384 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128 + 2 * 256
    assert sum(p.numel() for p in gpt.parameters()) == 4 * block + VOCAB * 128 + 128 * 128 + 256 == 823_040
    vit = build("vit-tiny", seed=0)
    assert sum(p.numel() for p in vit.parameters()) == 204_938 < 1_000_000
    assert build("vit-tiny-cifar", seed=0)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert vit(torch.zeros(3, *MODELS["vit-tiny"].input_shape)).shape == (3, 10)


def test_char_gpt_is_causal():
    gpt = build("char-gpt", seed=0, vocab_size=VOCAB).eval()
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 7) % VOCAB  # change the future from position 20 on
    with torch.no_grad():
        a, b = gpt.logits_3d(x), gpt.logits_3d(y)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)
    assert gpt(x).shape == (2 * 32, VOCAB)


def test_tied_embedding_is_one_parameter_permuted_once_by_rows():
    gpt = build("char-gpt", seed=0, vocab_size=VOCAB)
    groups = laperm_param_groups(gpt)
    names = [n for g in groups for n in g["param_names"]]
    assert names.count("tok.weight") == 1 and len(names) == len(set(names))
    opt = LaPerm(torch.optim.Adam(groups, lr=1e-3), k=1)
    permuted = dict(opt.permuted_parameters())
    assert set(permuted) == set(permutable_layouts(gpt))  # the rebuild analysis permutes the same tensors
    assert {
        "tok.weight",
        "pos.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.fc1.weight",
    } <= set(permuted)
    assert not any("ln" in n or n.endswith(".bias") for n in permuted)  # LayerNorm and biases free
    assert opt.initial_sorted(gpt.tok.weight).shape == (VOCAB, 128)  # one row per token


def test_embeddings_and_layernorm_get_keras_init():
    gpt = build("char-gpt", seed=3, vocab_size=VOCAB)
    bound = math.sqrt(6 / 128)
    for table in (gpt.tok.weight, gpt.pos.weight):
        assert table.abs().max() <= bound and table.abs().max() > 0.9 * bound
    ln = gpt.blocks[0].ln1
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert torch.all(gpt.blocks[0].attn.qkv.bias == 0)
    assert torch.equal(build("char-gpt", seed=3, vocab_size=VOCAB).tok.weight, gpt.tok.weight)


@pytest.mark.parametrize("name", ["char-gpt", "vit-tiny"])
def test_every_permuted_row_stays_a_permutation_of_its_initial_row(name):
    torch.manual_seed(0)
    if name == "char-gpt":
        model = CharGPT(vocab_size=20, context=16, width=32, layers=2, generator=torch.Generator().manual_seed(0))
        x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4 * 16,))
    else:
        model = build(name, seed=0)
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LaPerm(torch.optim.Adam(laperm_param_groups(model), lr=1e-2), k=3)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.sync()
    for n, p in opt.permuted_parameters():
        rows, rows0 = p.detach().flatten(1), init[n].flatten(1)
        assert torch.equal(rows.sort(1).values, rows0.sort(1).values), n
        assert not torch.equal(rows, rows0), n  # it did reconnect


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_text_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="empty"):
        textdata.load_text(_write(tmp_path / "empty.txt", "  \n"))
    (tmp_path / "bin.dat").write_bytes(b"abc\0def")
    with pytest.raises(DataError, match="not UTF-8"):
        textdata.load_text(tmp_path / "bin.dat")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        textdata.load_text(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="does not exist"):
        textdata.load_text(tmp_path / "nope")
    only_binary = tmp_path / "imgs"
    only_binary.mkdir()
    (only_binary / "a.png").write_bytes(b"\x89PNG\0\0")
    with pytest.raises(DataError, match="no UTF-8 text files"):
        textdata.load_text(only_binary)
    short = textdata.load_text_corpus(_write(tmp_path / "short.txt", "hello world " * 100))
    with pytest.raises(DataError, match="too short.*at least 2,580 characters"):
        textdata.check_length(short, 128)


def test_folder_reading_is_sorted_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b" / "2.md", "second\r\nline")
    _write(tmp_path / "a.txt", "first")
    (tmp_path / "b" / "pic.png").write_bytes(b"\x89PNG\0")
    (tmp_path / ".git").mkdir()
    _write(tmp_path / ".git" / "HEAD", "hidden")
    assert textdata.load_text(tmp_path) == "first\n\nsecond\nline"


def test_default_corpus_and_vocab_round_trip(tmp_path):
    corpus = textdata.load_text_corpus()
    text = textdata.default_corpus_text()
    assert len(text) > 400_000 and "assert" in text
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == len(text)
    assert corpus.vocab[0] == textdata.UNK and len(corpus.vocab) == VOCAB
    val_text = text[len(corpus.train) : len(corpus.train) + len(corpus.val)]
    known = "".join(c for c in val_text if c in corpus.vocab[1:])
    assert textdata.decode(corpus.val, corpus.vocab).replace("\ufffd", "") == known
    textdata.write_vocab(tmp_path / "vocab.json", corpus.vocab)
    assert textdata.read_vocab(tmp_path / "vocab.json") == corpus.vocab
    assert textdata.encode("ab\u2603", ["<unk>", "a", "b"]).tolist() == [1, 2, 0]


def test_windows_are_reproducible_and_resumable():
    ids = torch.arange(5000)

    def batches(loader, n):
        return [b for _, b in zip(range(n), loader, strict=False)]

    a = textdata.WindowLoader(ids, 16, 4, seed=1)
    first = batches(a, 10)
    again = batches(textdata.WindowLoader(ids, 16, 4, seed=1), 10)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    x, y = first[0]
    assert x.shape == (4, 16) and torch.equal(y.view(4, 16), x + 1)  # targets: the next characters
    b = textdata.WindowLoader(ids, 16, 4, seed=1)
    it = iter(b)
    for _ in range(4):
        next(it)
    state = b.state_dict()
    c = textdata.WindowLoader(ids, 16, 4, seed=1)
    c.load_state_dict(state)
    c.set_epoch(state["epoch"])
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches(c, 6), first[4:10], strict=True))
    assert not torch.equal(batches(textdata.WindowLoader(ids, 16, 4, seed=2), 1)[0][0], x)
    with pytest.raises(ValueError, match="batch_size"):
        textdata.WindowLoader(ids, 16, 8, seed=1).load_state_dict(state)


def test_eval_windows_tile_the_split():
    ids = torch.arange(100)
    windows = list(textdata.EvalWindows(ids, 16, batch_size=4))
    xs = torch.cat([x for x, _ in windows])
    assert xs.shape == (6, 16) and torch.equal(xs.flatten(), torch.arange(96))


def test_bits_per_char_against_a_hand_computation():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)], [math.log(1.0), math.log(1.0)]])
    target = torch.tensor([1, 0])  # p = 3/4 and 1/2
    nats = F.cross_entropy(logits, target).item()
    assert textdata.bits_per_char(nats) == pytest.approx((-math.log2(0.75) - math.log2(0.5)) / 2)


def test_greedy_and_seeded_samples():
    gpt = CharGPT(vocab_size=5, context=8, width=16, layers=1, heads=2, generator=torch.Generator().manual_seed(0))
    vocab = ["<unk>", "a", "b", "c", " "]
    greedy = textdata.sample_text(gpt, vocab, "ab", 20)
    assert greedy == textdata.sample_text(gpt, vocab, "ab", 20) and len(greedy) == 22 and greedy.startswith("ab")
    hot = [textdata.sample_text(gpt, vocab, "ab", 20, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert hot[0] == hot[1] != hot[2]


@pytest.mark.slow
def test_train_char_gpt_end_to_end_prints_a_sample_and_verifies(tmp_path, capsys, clean_engine_state):
    rc, out, err = run_cli(
        capsys,
        "train",
        "--preset",
        "char-gpt",
        "--epochs",
        "1",
        "--train-subset",
        "9000",
        "--k",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "gpt",
        "--no-progress",
    )
    assert rc == 0, err
    assert "sample (temperature 0.8, seed 0, final synced model): " in out and "bits per character" in out
    run = tmp_path / "gpt"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_bpc"] > 0 and summary["sample"].startswith("The ")
    assert textdata.read_vocab(run / "vocab.json") == textdata.load_text_corpus().vocab
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["val_bpc"] == pytest.approx(record["val_loss"] / math.log(2))
    rc, out, _ = run_cli(capsys, "verify", str(run))
    assert rc == 0 and "row-wise permutations" in out
    # the compact export rebuilds θ0 from the seed, which needs the vocabulary's size (vocab.json)
    rc, out, err = run_cli(capsys, "export", str(run), "-o", str(tmp_path / "gpt.laperm"), "--check")
    assert rc == 0 and "θ0 rebuilt from the seed" in out and "reloads bit-exactly" in out, err
    saved = load(run / "final.pt")["model"]
    reloaded = load_compact(tmp_path / "gpt.laperm")
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)


def test_train_text_from_a_folder_and_refuse_too_short(tmp_path, capsys, clean_engine_state):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write(corpus / "a.txt", "the quick brown fox jumps over the lazy dog. " * 120)
    rc, out, err = run_cli(
        capsys,
        "train",
        "--preset",
        "char-gpt",
        "--data-dir",
        str(corpus),
        "--epochs",
        "1",
        "--optimizer",
        "adam",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "fox",
        "--no-progress",
    )
    assert rc == 0, err
    assert "bits per character" in out
    _write(tmp_path / "tiny.txt", "too short")
    rc, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "char-gpt",
        "--data-dir",
        str(tmp_path / "tiny.txt"),
        "--out",
        str(tmp_path / "runs"),
        "--no-progress",
    )
    assert rc != 0 and "too short" in err
    assert not any(p.name.startswith("char-gpt") for p in (tmp_path / "runs").iterdir())  # no half-made folder


def test_text_model_and_image_data_do_not_mix(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--model", "char-gpt", "--dataset", "mnist", "--out", str(tmp_path))
    assert rc != 0 and "char-gpt for --dataset text" in err
    rc, _, err = run_cli(capsys, "train", "--model", "lenet300", "--dataset", "text", "--out", str(tmp_path))
    assert rc != 0 and "pick a matching" in err


def test_layouts_of_nn_modules_unchanged_for_old_models():
    lin = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert set(permutable_layouts(lin, permute_biases=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.slow
def test_text_run_resumes_bit_identically(tmp_path, capsys, clean_engine_state):
    common = ("--preset", "char-gpt", "--train-subset", "9000", "--k", "3", "--batch-size", "4", "--no-progress")
    assert run_cli(capsys, "train", *common, "--epochs", "2", "--out", str(tmp_path / "a"), "--name", "r")[0] == 0
    assert run_cli(capsys, "train", *common, "--epochs", "1", "--out", str(tmp_path / "b"), "--name", "r")[0] == 0
    rc, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "b" / "r"), "--epochs", "2", "--no-progress")
    assert rc == 0, err
    a = load(tmp_path / "a" / "r" / "final.pt")["model"]
    b = load(tmp_path / "b" / "r" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_transformers_experiment_quick_smoke_and_report(tmp_path, clean_engine_state):
    from laperm.experiments import report, suite  # noqa: F401 - registers the experiments
    from laperm.experiments.base import EXPERIMENTS, run_experiment

    runs = EXPERIMENTS["transformers"].make_runs("paper", [0, 1, 2])
    parts = [(r.tags["model"], r.tags["part"]) for r in runs]
    assert parts.count(("char-gpt", "main")) == parts.count(("vit-tiny", "main")) == 6
    assert parts.count(("char-gpt", "best")) == parts.count(("vit-tiny", "best")) == 3
    assert all(r.hook == "rebuild" for r in runs if r.tags["part"] == "main" and r.tags["method"] == "adam")
    best = [r.overrides for r in runs if r.tags["part"] == "best"]
    assert all(o["sync_rule"] == "latent" and o["k"] == 1 and "optimizer" not in o for o in best)
    res = tmp_path / "results"
    for only in (
        "model=char-gpt seed=0 part=main",
        "model=char-gpt seed=0 part=best",
        "model=vit-tiny seed=0 part=why",
    ):
        run_experiment("transformers", budget="quick", seeds=[0], out=res, only=only, log=lambda s: None)
    folder = res / "transformers"
    adam = next(folder.glob("char-gpt-adam-*"))
    rebuild = [json.loads(line) for line in (adam / "rebuild.jsonl").read_text().splitlines()]
    assert {"trained", "rebuilt", "random_perm", "rebuilt_bpc", "random_perm_bpc"} <= rebuild[-1].keys()
    prof = json.loads(next(folder.glob("profiles__char-gpt-adam-*.json")).read_text())
    assert {"embeddings", "attention", "MLP"} <= prof["by_type"].keys()
    assert all(
        v["drift"] == 0
        for v in json.loads(next(folder.glob("profiles__char-gpt-laperm-*.json")).read_text())["by_type"].values()
    )  # LaPerm keeps profiles
    md = report.write_report(res, tmp_path / "docs").read_text()
    assert "## Transformers (beyond the paper)" in md and "LaPerm / Adam validation bits per character" in md
    assert "| LaPerm, latent sync rule, k=1 |" in md and "| latent sync rule, k=1 | laperm |" in md
    assert "Where a sync costs" in md and "| epoch | steps since sync | inner | only embed |" in md
    assert (tmp_path / "docs" / "figures" / "transformers_char-gpt.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["overwrite", "latent"])
def test_sync_cost_probe_measures_each_layer_type_and_leaves_training_alone(tmp_path, clean_engine_state, rule):
    from laperm.config import resolve_config
    from laperm.experiments.hooks import make
    from laperm.train import train

    common = dict(model="vit-tiny", epochs=2, batch_size=128, k=5, train_subset=512, val_size=500, seed=4)
    common.update(sync_rule=rule, progress=False, threads=1)
    runs = {}
    for name, hook in (("plain", None), ("probed", "synccost")):
        cfg = resolve_config(dict(common, out=str(tmp_path), name=name))
        probe = make(hook, cfg, tmp_path / name)
        probe.finish(train(cfg, callbacks=probe, log=lambda s: None))
        runs[name] = tmp_path / name
    a, b = (load(runs[n] / "final.pt")["model"] for n in ("plain", "probed"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the probe restores every weight it touched
    records = [json.loads(line) for line in (runs["probed"] / "synccost.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (runs["probed"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r, m in zip(records, metrics, strict=True):
        roles = {"embed", "pos", "attn.qkv", "attn.proj", "fc1", "fc2", "head"}
        measured = r.keys() - {"epoch", "steps_since_sync", "weights"}
        assert {"inner", "synced"} | {f"only {role}" for role in roles} == measured and r["weights"].keys() == roles
        assert all(w["change"] > 0 and w["scale"] > 0 for w in r["weights"].values())
        assert r["synced"]["loss"] == pytest.approx(m["val_loss"], rel=1e-6)  # what the engine evaluated
        assert r["inner"]["loss"] != r["synced"]["loss"]
    assert [r["steps_since_sync"] for r in records] == [4, 3]  # 4 steps an epoch, a sync every 5


def test_weight_role_names_the_same_tensor_of_every_block():
    from laperm.models.transformer import layer_type, weight_role

    assert weight_role("blocks.2.attn.qkv.weight") == weight_role("blocks.0.attn.qkv.weight") == "attn.qkv"
    assert [weight_role(n) for n in ("tok.weight", "blocks.3.fc2.weight", "head.weight")] == ["tok", "fc2", "head"]
    assert [layer_type(n) for n in ("tok.weight", "blocks.3.fc2.weight", "blocks.1.attn.proj.weight")] == [
        "embeddings",
        "MLP",
        "attention",
    ]
