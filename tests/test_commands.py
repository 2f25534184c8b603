"""The commands share one CLI style (``s1fast.commands``): the same flags for the same things, one ``--dtype``
spelling, ``--device`` / ``--dtype`` defaults from one place, the requests' sampling check (``SamplingParams``), and
every argument error as ``s1fast <command>: error: ...`` with exit status 2 before anything loads.
No model is loaded here."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from s1fast import commands
from s1fast.cli import main as s1fast_main

params = importlib.import_module("s1fast.decode.params")
patch_module = importlib.import_module("s1fast.model.patch")  # the package attribute is the function

# command -> (module with _parser(), the shared flags it must have)
COMMANDS = {
    "generate": ("s1fast.decode.generate", {"--model", "--out", "--no-progress", "--device", "--dtype", "--max-rows"}),
    "eval": ("s1fast.eval.scaling", {"--model", "--out", "--no-progress", "--device", "--dtype", "--max-rows"}),
    "serve": ("s1fast.decode.serve", {"--model", "--device", "--dtype", "--max-rows"}),
    "bench": ("s1fast.bench.cli", {"--out", "--device"}),
}
OLD_FLAGS = {"--output", "--output-dir", "--quiet", "--batch-size"}


@pytest.mark.parametrize("name", COMMANDS)
def test_parsers_share_the_flags(name):
    module, flags = COMMANDS[name]
    parser = importlib.import_module(module)._parser()
    actions = {flag: a for a in parser._actions for flag in a.option_strings}
    assert parser.prog == f"s1fast {name}"
    assert flags <= set(actions) and not OLD_FLAGS & set(actions), sorted(actions)
    assert "model" not in [a.dest for a in parser._actions if not a.option_strings]  # --model, not positional
    if "--model" in flags:  # eval decodes here (--model) or through servers (--endpoint): one of the two
        assert actions["--model"].required or name == "eval"
    assert actions["--device"].default == commands.default_device()
    if "--dtype" in flags:
        assert tuple(actions["--dtype"].choices) == tuple(commands.DTYPES) and actions["--dtype"].default is None



@pytest.mark.parametrize("module", ["s1fast.decode.generate", "s1fast.decode.serve", "s1fast.train.cli",
                                    "s1fast.data.cli", "s1fast.eval.scaling", "s1fast.bench.cli"])
def test_no_option_is_taken_for_a_longer_one(module):
    """A prefix of a long option is left unknown, not read as that option (argparse's default): in ``s1fast data
    distill``, ``--model`` would have been ``--model-name``. Every long option of every (sub)parser, cut by one (the
    required arguments made optional, so that only the prefix is parsed)."""
    parser = importlib.import_module(module)._parser()
    subs = [a for a in parser._actions if isinstance(a.choices, dict)]
    tried = 0
    for p in [parser] + [p for a in subs for p in a.choices.values()]:
        for action in p._actions + p._mutually_exclusive_groups:
            action.required = False
        for flag in [f for a in p._actions for f in a.option_strings if f.startswith("--") and len(f) > 4]:
            if flag[:-1] not in p._option_string_actions:
                assert p.parse_known_args([flag[:-1]])[1] == [flag[:-1]], flag
                tried += 1
    assert tried >= 5


def required(name: str, out) -> list[str]:
    """The least each command needs to get as far as its --device check; ``out`` must not be created."""
    return {
        "generate": ["--model", "no-such-model", "--prompt", "x", "--out", str(out)],
        "eval": ["--model", "no-such-model", "--problems", "no-such-problems.jsonl", "--out", str(out)],
        "serve": ["--model", "no-such-model"],
        "bench": ["kernels", "--out", str(out)],
    }[name]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("device, message", [
    ("bogus", "--device must be cuda[:N] or cpu, got 'bogus'"),
    ("meta", "--device must be cuda[:N] or cpu, got 'meta'"),
])
def test_a_bad_device_is_refused_before_anything_loads(name, device, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("s1fast.bench.cli.device_ceilings", lambda *a, **k: pytest.fail("the benchmark ran"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *required(name, out), "--device", device])
    err = capsys.readouterr().err
    usage = importlib.import_module(COMMANDS[name][0])._parser().format_usage()
    assert e.value.code == 2 and err == f"{usage}s1fast {name}: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("name", ["generate", "eval", "serve"])
def test_one_dtype_spelling(name, tmp_path, capsys):
    """torch's names are not a second spelling of --dtype."""
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *required(name, tmp_path / "out"), "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast {name}: error: argument --dtype: invalid choice: 'bfloat16'" in err


def test_device_and_dtype_defaults():
    assert commands.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert commands.default_dtype("cuda:1") == "bf16" and commands.default_dtype(torch.device("cpu")) == "fp32"
    assert commands.check_dtype(None, "cpu") is torch.float32 and commands.check_dtype(None, "cuda") is torch.bfloat16
    assert commands.check_dtype("fp16", "cpu") is torch.float16
    assert commands.check_dtype("fp64", "cuda") is torch.float64
    with pytest.raises(ValueError, match=r"^--dtype must be one of bf16, fp16, fp32, fp64, got 'float32'$"):
        commands.check_dtype("float32", "cpu")


def test_sampling_arguments_are_checked_by_sampling_params(monkeypatch):
    """``commands.check_sampling`` builds the ``SamplingParams`` every request is built into, before a model
    exists."""
    calls, expected = [], params.SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    real = params.SamplingParams.__post_init__
    monkeypatch.setattr(params.SamplingParams, "__post_init__", lambda self: calls.append(self) or real(self))
    commands.check_sampling(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert calls == [expected]
    for bad, message in [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be a number >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be finite, got inf"),
        (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
        (dict(top_p=0.0), "top_p must be None or a number in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be None or a number in (0, 1], got 1.5"),
    ]:
        with pytest.raises(ValueError) as e:
            commands.check_sampling(**{"max_new_tokens": 8, "temperature": 0.0, **bad})
        assert str(e.value) == f"sampling: {message}"


@pytest.mark.parametrize("value, expected", [
    ("8GiB", {"kv_cache_bytes": 8 * 2**30}), ("1.5MiB", {"kv_cache_bytes": 3 * 2**19}),
    ("0.9", {"kv_cache_fraction": 0.9}), ("1", {"kv_cache_fraction": 1.0}),
])
def test_kv_cache_budget(value, expected):
    assert commands.kv_cache_budget(value) == expected


@pytest.mark.parametrize("name", ["generate", "eval", "serve"])
@pytest.mark.parametrize("value, message", [
    ("2", "argument --kv-cache: expected a size with a unit"), ("8GB", "argument --kv-cache: expected a size"),
    ("0", "argument --kv-cache: expected a size"), ("0.5", "--kv-cache 0.5: a share of free GPU memory needs a CUDA"),
    ("infGiB", "argument --kv-cache: expected a size"), ("1e400GiB", "argument --kv-cache: expected a size"),
])
def test_a_bad_kv_cache_is_refused_before_anything_loads(name, value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *required(name, tmp_path / "out"), "--device", "cpu", "--kv-cache", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast {name}: error: {message}" in err, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_qwen import save_qwen_vocab_model

    return save_qwen_vocab_model(tmp_path_factory.mktemp("tiny"), hidden=32, intermediate=64, heads=2, kv_heads=1)


def _gpt2(model_dir, tmp_path) -> str:
    """The tiny model's directory with a GPT-2 config.json."""
    import shutil

    from transformers import GPT2Config

    path = shutil.copytree(model_dir, tmp_path / "gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", ["generate", "eval", "serve"])
@pytest.mark.parametrize("case, message", [
    ("--kv-cache 1KiB", "--kv-cache 1 KiB holds fewer than 2 KV pages of this model (2 KiB each: 16 tokens in fl"),
    ("--kv-cache 10TiB", "--kv-cache 10 TiB is more than the "),
    ("gpt2", "model_type 'gpt2'; s1fast runs Qwen2, Qwen2.5 and Qwen3 (qwen2, qwen3)"),
])
def test_what_the_config_tells_is_checked_before_the_weights_load(name, case, message, model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    model = _gpt2(model_dir, tmp_path) if case == "gpt2" else model_dir
    argv = [a if a != "no-such-model" else model for a in required(name, tmp_path / "out")]
    if name == "eval":
        from s1fast.eval.problems import EXAMPLE_PROBLEMS

        argv[argv.index("no-such-problems.jsonl")] = EXAMPLE_PROBLEMS
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *argv, "--device", "cpu", *(case.split() if case != "gpt2" else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast {name}: error: " in err and message in err and "Traceback" not in err, err
    assert err.endswith("\n") and "\n" not in err[err.index(f"s1fast {name}: error: "):-1]  # one line, the last
    assert not (tmp_path / "out").exists()


def test_serve_refuses_max_seq_len_beyond_the_model(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        s1fast_main(["serve", "--model", model_dir, "--device", "cpu", "--max-seq-len", "50000"])
    assert e.value.code == 2 and ("s1fast serve: error: --max-seq-len 50000 is more than the model's 512 positions "
                                  "(max_position_embeddings in its config.json)") in capsys.readouterr().err


@pytest.fixture
def silent_hub(monkeypatch):
    """A Hugging Face endpoint that accepts connections and never answers (a network that swallows packets)."""
    import socket

    import huggingface_hub.constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(commands, "HUB_PROBE_S", 0.5)
    yield
    server.close()


@pytest.mark.parametrize("name", ["train", "eval"])
@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_name_that_cannot_be_found_fails_at_once(name, offline, silent_hub, tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    argv = {"train": ["--model", "nobody/none", "--out", str(tmp_path / "out")],
            "eval": required("eval", tmp_path / "out")}[name]
    argv[argv.index("no-such-model") if "no-such-model" in argv else 1] = "nobody/none"
    if name == "eval":
        from s1fast.eval.problems import EXAMPLE_PROBLEMS

        argv[argv.index("no-such-problems.jsonl")] = EXAMPLE_PROBLEMS
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 30 and e.value.code == 2
    reason = ("and not in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline
              else "not in the Hugging Face cache, and the Hub did not answer within 0.5 s")
    assert f"s1fast {name}: error: --model 'nobody/none': no such directory, {reason}" in err, err


def test_bench_help_names_only_choices_that_exist(capsys):
    """`s1fast bench --help` points to `s1fast bench kit --help`: kit is a choice, and that help exists."""
    with pytest.raises(SystemExit) as e:
        s1fast_main(["bench", "--help"])
    usage = capsys.readouterr().out
    assert e.value.code == 0 and "`s1fast bench kit --help`" in usage and ",all,kit}" in usage
    with pytest.raises(SystemExit) as e:
        s1fast_main(["bench", "kit", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: s1fast bench kit")


def test_the_profiler_prints_no_usdt_lines():
    """`s1fast bench` measures CPU memory under torch.profiler, whose Kineto printed `USDT: ... profiler_start` at
    every shape. A fresh process (Kineto reads its log level once)."""
    import os
    import subprocess
    import sys

    code = ("from s1fast.cli import quiet_profiler_logs; quiet_profiler_logs(); import torch\n"
            "with torch.profiler.profile():\n    torch.ones(4) + 1\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "profiler_start" not in done.stderr, done.stderr


# --- issue 28 item 5, the probe round: values that went through argparse and broke later ---------------------------
TOO_MANY_THREADS = str((os.cpu_count() or 1) + 1)


@pytest.mark.parametrize("name, flags, message", [
    ("generate", ["--out", ""], "argument --out: expected a non-empty string, got ''"),  # was: printed, no file
    ("eval", ["--out", ""], "argument --out: expected a non-empty string, got ''"),
    ("generate", ["--threads", TOO_MANY_THREADS], "argument --threads: expected an integer >= 1 and < "),  # crashed
    ("eval", ["--threads", TOO_MANY_THREADS], "argument --threads: expected an integer >= 1 and < "),
    ("serve", ["--port", "70000"], "argument --port: expected an integer >= 1 and < 65536, got '70000'"),  # loaded
    ("serve", ["--port", "0"], "argument --port: expected an integer >= 1 and < 65536, got '0'"),
    ("serve", ["--host", ""], "argument --host: expected a non-empty string, got ''"),
    ("serve", ["--api-key", ""], "argument --api-key: expected a non-empty string, got ''"),  # was: a key of ''
    ("serve", ["--served-model-name", ""], "argument --served-model-name: expected a non-empty string, got ''"),
    ("generate", ["--tokenizer", ""], "argument --tokenizer: expected a non-empty string, got ''"),
    ("serve", ["--tokenizer", ""], "argument --tokenizer: expected a non-empty string, got ''"),
])
def test_empty_and_out_of_range_values_are_refused_at_parsing(name, flags, message, tmp_path, capsys, monkeypatch):
    """Each of these passed parsing and loaded the model before (generate --threads with more threads than CPUs
    segfaulted torch's thread pool; serve --port 70000 failed after the load)."""
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = required(name, tmp_path / "out")
    if "--out" in flags:
        del argv[argv.index("--out"):argv.index("--out") + 2]
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *argv, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"s1fast {name}: error: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_set_cpu_threads_refuses_more_threads_than_cpus():
    from s1fast.decode.decoder import set_cpu_threads

    n = TOO_MANY_THREADS
    message = rf"threads must be None or an int in \[1, {int(n) - 1}\] \(this machine's CPUs\), got {n}"
    with pytest.raises(ValueError, match=message):
        set_cpu_threads(torch.nn.Linear(1, 1), int(TOO_MANY_THREADS))


def test_eval_out_on_a_file_names_out(model_dir, tmp_path, capsys, monkeypatch):
    """A file where eval's output directory should go: one line naming --out (was: bare "[Errno 20] ...")."""
    from s1fast.eval.problems import EXAMPLE_PROBLEMS

    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("kept")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(SystemExit) as e:
            s1fast_main(["eval", "--model", model_dir, "--problems", EXAMPLE_PROBLEMS, "--out", str(out),
                         "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert f"s1fast eval: error: --out {str(out)!r}: cannot create the output directory (Not a directory)\n" in err
    assert (tmp_path / "file").read_text() == "kept"


@pytest.mark.parametrize("name", ["generate", "serve"])
def test_a_missing_tokenizer_is_named_before_anything_loads(name, model_dir, tmp_path, capsys, monkeypatch):
    """--tokenizer that is no directory: one line naming --tokenizer (was: the Hub's "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'"), before the model loads."""
    monkeypatch.setattr(patch_module, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = [model_dir if a == "no-such-model" else a for a in required(name, tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        s1fast_main([name, *argv, "--device", "cpu", "--max-new-tokens" if name == "generate" else "--max-rows",
                     "8", "--tokenizer", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.endswith(f"s1fast {name}: error: --tokenizer {str(tmp_path / 'nowhere')!r}: no such directory, and "
                        "not a Hugging Face name (owner/name)\n"), err
