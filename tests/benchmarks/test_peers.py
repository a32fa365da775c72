"""benchmarks/peers.py without its peers: argument parsing, the table and its ratios, the parsing of the
workers' and llama.cpp tools' output, and a failed setup becoming rows. No venv, no build, no network."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("peers_bench", None)


def test_defaults_run_every_engine_twice_on_the_throughput_workload(peers):
    args = peers.parse_args([])
    assert [e.name for e in args.engines] == peers.ENGINE_NAMES
    assert args.rounds == 2 and args.concurrency == 32 and args.num_prompts == 32
    assert (args.min_input, args.max_input, args.min_output, args.max_output) == (16, 128, 16, 128)


def test_only_skip_and_quick(peers):
    args = peers.parse_args(["--only", "vllm-fp32, pagedllm", "--quick"])
    assert [e.name for e in args.engines] == ["pagedllm", "vllm-fp32"]  # the table's order
    assert args.rounds == 1 and args.num_prompts == 4 and args.concurrency == 4 and args.max_output == 8
    assert peers.parse_args(["--quick", "--rounds", "3"]).rounds == 3
    args = peers.parse_args(["--skip", "vllm-fp32,vllm-bf16,transformers"])
    assert {e.name for e in args.engines} == set(peers.ENGINE_NAMES) - {"vllm-fp32", "vllm-bf16", "transformers"}
    with pytest.raises(SystemExit, match="unknown engine.*vllm-cuda"):
        peers.parse_args(["--only", "pagedllm,vllm-cuda"])


def row(peers, engine, conc, round_, tok_s, ttft=None, note="", precision="fp32"):
    return peers.Row(engine, precision, conc, round_, tok_s, ttft, note)


def test_table_ratios_are_per_round_and_per_concurrency(peers):
    rows = [row(peers, "pagedllm", 32, 1, 300.0, 2.5), row(peers, "pagedllm", 1, 1, 80.0, 0.1),
            row(peers, "vllm-fp32", 32, 1, 150.0, 2.0), row(peers, "vllm-fp32", 1, 1, 40.0, 0.2),
            row(peers, "pagedllm", 32, 2, 200.0, 3.0), row(peers, "pagedllm", 1, 2, 80.0, 0.1),
            row(peers, "vllm-fp32", 32, 2, 200.0, 2.2), row(peers, "vllm-fp32", 1, 2, 20.0, 0.3)]
    lines = peers.format_table(rows).splitlines()
    assert lines[0].startswith("| engine | precision | concurrency | output tok/s | ratio to pagedllm | TTFT s |")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [b[0] for b in body] == ["pagedllm", "pagedllm", "vllm-fp32", "vllm-fp32"]
    assert body[0][2:6] == ["32", "300.0 / 200.0", "1.00 / 1.00x", "2.50 / 3.00"]
    assert body[2][2:6] == ["32", "150.0 / 200.0", "0.50 / 1.00x", "2.00 / 2.20"]
    assert body[3][2:6] == ["1", "40.0 / 20.0", "0.50 / 0.25x", "0.20 / 0.30"]


def test_a_failed_engine_is_a_row_that_says_why_and_has_no_ratio(peers):
    rows = [row(peers, "pagedllm", 32, 1, 300.0), row(peers, "llama-bench", 1, 1, None, note="FAILED: timed out"),
            row(peers, "vllm-bf16", 32, 1, 90.0)]  # no pagedllm row at batch 1: no ratio there either
    body = [[c.strip() for c in line.strip("|").split("|")] for line in peers.format_table(rows).splitlines()[2:]]
    assert body[1] == ["llama-bench", "fp32", "1", "-", "-", "-", "FAILED: timed out"]
    assert body[2][3:5] == ["90.0", "0.30x"]


def test_missing_round_shows_a_dash_in_its_place(peers):
    rows = [row(peers, "pagedllm", 32, 1, 300.0), row(peers, "pagedllm", 32, 2, 310.0),
            row(peers, "transformers", 32, 1, None, note="FAILED: exit 1: boom"), row(peers, "transformers", 32, 2, 60.0)]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in peers.format_table(rows).splitlines()[2:]]
    assert body[1][3:5] == ["- / 60.0", "- / 0.19x"] and body[1][6] == "FAILED: exit 1: boom"


def test_worker_output_the_last_result_line_or_the_reason_it_failed(peers):
    out = "noise\nPEER_RESULT {\"tok_s\": 1.0}\nPEER_RESULT {\"tok_s\": 2.5, \"ttft_s\": 0.5}\n"
    assert peers.parse_worker_output(0, out, "") == {"tok_s": 2.5, "ttft_s": 0.5}
    with pytest.raises(RuntimeError, match=r"exit 1: ModuleNotFoundError: No module named 'vllm'"):
        peers.parse_worker_output(1, "", "Traceback\n  File x\nModuleNotFoundError: No module named 'vllm'\n")
    with pytest.raises(RuntimeError, match="exit 0: no output"):
        peers.parse_worker_output(0, "", "")


def test_llama_bench_json_gives_decode_rate_and_prompt_time(peers):
    engine = peers.ENGINES[peers.ENGINE_NAMES.index("llama-bench")]
    out = json.dumps([{"n_prompt": 72, "n_gen": 0, "avg_ts": 360.0}, {"n_prompt": 0, "n_gen": 48, "avg_ts": 90.5}])
    [r] = peers.llama_bench_rows(out, engine, 2, 72)
    assert (r.concurrency, r.round, r.tok_s) == (1, 2, 90.5)
    assert r.ttft_s == pytest.approx(0.2) and "pp72: 360.0 tok/s" in r.note and "tg48" in r.note


def test_batched_bench_jsonl_counts_output_tokens_over_the_whole_time(peers):
    engine = peers.ENGINES[peers.ENGINE_NAMES.index("llama-batched-bench")]
    out = ("main: n_kv_max = 4864\n"
           '{"n_kv_max": 4864, "pp": 72, "tg": 72, "pl": 32, "n_kv": 4608, "t_pp": 4.0, "speed_pp": 576.0, '
           '"t_tg": 12.0, "speed_tg": 192.0, "t": 16.0, "speed": 288.0}\n')
    [r] = peers.batched_bench_rows(out, engine, 1)
    assert r.concurrency == 32 and r.tok_s == pytest.approx(32 * 72 / 16.0) and r.ttft_s == 4.0
    assert "decode only 192.0 tok/s" in r.note
    with pytest.raises(RuntimeError, match="no jsonl"):
        peers.batched_bench_rows("main: nothing\n", engine, 1)


def test_batch_one_decode_rate_leaves_out_each_prompts_ttft(peers):
    """4 prompts of 33 tokens in 2.0 s, 0.1 s to each first token: 128 tokens in 1.6 s."""
    assert peers.decode_only_note(132, 4, 2.0, 0.1) == "decode only 80.0 tok/s (TTFT pass subtracted)"
    assert peers.decode_only_note(132, 4, 0.3, 0.1) == ""  # the TTFT pass took longer: no rate
    assert peers.decode_only_note(4, 4, 2.0, 0.1) == ""    # one token each: nothing decoded


def test_a_setup_failure_gives_rows_for_each_workload_without_running_anything(peers):
    args = peers.parse_args(["--only", "vllm-bf16,llama-bench,llama-batched-bench"])
    ctx = {"setup_errors": {"vllm": "setup: pip failed", "llamacpp": "setup: cmake failed"}}
    vllm, batched, bench = args.engines
    assert [(r.concurrency, r.note) for r in peers.run_engine(vllm, args, ctx, 1)] == \
        [(32, "FAILED: setup: pip failed"), (1, "FAILED: setup: pip failed")]
    assert [r.concurrency for r in peers.run_engine(bench, args, ctx, 1)] == [1]
    assert [r.concurrency for r in peers.run_engine(batched, args, ctx, 1)] == [32]


def test_the_workload_is_throughput_py_s(peers):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    from throughput import workload
    args = peers.parse_args([])
    prompts, outs = peers.workload_of(args, 1000, batch1=False)
    assert (prompts, outs) == workload(argparse.Namespace(**vars(args)), 1000)
    b1_prompts, b1_outs = peers.workload_of(args, 1000, batch1=True)
    assert len(b1_prompts) == 4 and all(32 <= n <= 64 for n in b1_outs)
    assert peers.mean_lengths([[1] * 10, [1] * 20], [5, 6]) == (15, 6)


def test_rows_saved_as_json_give_the_same_table_back(peers, tmp_path, capsys):
    from dataclasses import asdict
    rows = [row(peers, "pagedllm", 32, 1, 300.0, 2.5), row(peers, "vllm-bf16", 32, 1, None, note="FAILED: x")]
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps([asdict(r) for r in rows]))
    assert peers.load_rows(saved) == rows
    peers.main(["--table", str(saved)])
    assert capsys.readouterr().out.strip() == peers.format_table(rows)
