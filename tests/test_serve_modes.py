"""`simkit serve` modes against the fast fake server (no model): --pseudo-label (Phase 1 labels from
the LLM annotator), --n-conversations recorded, Phase 1 path counts in the metrics, --sync, --mode irpo."""
import json
import subprocess
import sys

from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.act.pairs import read_pairs
from simkit.queue import open_queue


def _serve(srv, tmp_path, name, *extra):
    run = tmp_path / name
    cmd = [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(tmp_path / f"{name}.db"),
           "--run-dir", str(run), "--policy", srv.url, "--max-tokens", "8", "--max-epochs", "1", "--poll-s", "0.1",
           "--n-conversations", "6", "--contrast", "forced", "--pairs-per-conversation", "one", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, json.loads(res.stdout.strip().splitlines()[-1])


def test_serve_pseudo_label_sync_and_irpo(tmp_path):
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        run, summary = _serve(srv, tmp_path, "pseudo", "--pseudo-label", "--classifier", srv.url, "--sync")
        dpref = read_pairs(run / "dpref.jsonl")
        assert len(dpref) + summary["phase1"]["identical_dropped"] == 6
        assert all(p.meta["label_source"] == "annotator" for p in dpref)
        assert summary["sync"] is True and "max_staleness" not in summary  # the trainer's setting
        assert sum(summary["phase1"][k] for k in ("forced_ok", "retried_ok", "fallback")) == 6
        assert summary["classifier"].startswith("LLM") and summary["simulator"].startswith("grounded")
        conv = json.loads((run / "conversations.json").read_text())
        assert conv["n_conversations"] == 6 and len(conv["conversation_ids"]) == 6

        rule = subprocess.run([sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue",
                               str(tmp_path / "r.db"), "--run-dir", str(tmp_path / "r"), "--policy", srv.url,
                               "--pseudo-label"], capture_output=True, text=True, timeout=120)
        assert rule.returncode != 0 and "--pseudo-label needs an LLM annotator" in rule.stderr

        run, summary = _serve(srv, tmp_path, "irpo", "--mode", "irpo", "--irpo-samples", "2")
        assert summary["mode"] == "irpo" and summary["episodes"] == 6 and not (run / "dpref.jsonl").exists()
        assert summary["pairs"] + summary["no_contrast"] + summary["identical_dropped"] + summary["failures"] == 6
        with open_queue(tmp_path / "irpo.db") as q:
            assert all(p.source == "irpo" for p in q.lease(100, consumer="check").pairs)
