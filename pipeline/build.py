"""The build: LAION metadata parquet -> face-filtered webdataset shards + Parquet metadata.

`build(config)` runs (or, after a kill, finishes) one build; its command line is
`pipeline/build_laion_face.py`. Data flows one way, one work unit (`shard_size` input rows, by
default a few units per CPU) per row: source -> fetch -> decode (CPU tasks) -> detect (actor pool)
-> filter -> write, or without a detector all of it in the fetching task; then the global dedupes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data._internal.stats import get_or_create_stats_actor
from tqdm import tqdm

from pipeline import dedupe, summary
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.decode import decode_sample
from pipeline.detect import DetectActor, insightface_model_path
from pipeline.exclusions import exclusion_sets
from pipeline.face_hash import shared_face_hasher
from pipeline.face_overlaps import face_overlap_removals
from pipeline.fetch import fetch_samples
from pipeline.filter import filter_samples
from pipeline.lock import OutputLock
from pipeline.near_dedupe import near_duplicate_removals
from pipeline.report import write_report
from pipeline.schema import (METADATA_SCHEMA, PHASH_VERSION, TRANSIENT_STATUSES, iter_units, pack, phash_version,
                             shard_attempt, shard_name, shard_unit)
from pipeline.source import (Unit, check_inputs, expand_inputs, input_rows, load_allowlist, plan_units, read_rows,
                             read_unit, register_inputs, unit_samples)
from pipeline.storage import Output, StorageError
from pipeline.takedown import Takedowns, load_takedowns, takedown_removals
from pipeline.text_inputs import staged_parquet
from pipeline.write import commit_unit, referenced_shards, remove_orphans


@dataclass
class Work:
    """One unit to process: all of its rows, or (--retry-failed) only some, into a new shard."""

    unit: Unit
    shard: str
    only_rows: list[int] = field(default_factory=list)

    def row(self) -> dict:
        u = self.unit
        return {"unit": u.unit, "file_index": u.file_index, "path": u.path, "start": u.start, "stop": u.stop,
                "shard": self.shard, "only_rows": self.only_rows}


def _work_rows(batch: dict) -> list[tuple[Unit, dict]]:
    """The units of a batch of Work.row() dicts, with their rows."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return [(Unit(int(r["unit"]), int(r["file_index"]), str(r["path"]), int(r["start"]), int(r["stop"])), r)
            for r in rows]


# --- the stages as Ray Data runs them: plain functions over batches of work units ----------------

def resolved(value):
    """A UDF's fn_kwargs arrive as given, so a list put in the object store once (the allow-list,
    the takedowns) arrives as its ObjectRef: fetched here, zero-copy for arrays on this node."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def source_fetch_decode(batch: dict, config: BuildConfig, output_url: str, allowlist: np.ndarray | None,
                        takedowns: Takedowns) -> dict:
    """One CPU task per unit: read its rows, download them, decode them; taken-down images go no further."""
    output, allowlist, takedowns = Output(output_url), resolved(allowlist), resolved(takedowns)
    packed: dict[str, list] = {"unit": [], "shard": [], "samples": []}
    for unit, row in _work_rows(batch):
        only_rows = {int(r) for r in row["only_rows"]} or None
        samples = read_unit(unit, config, allowlist, dedupe.read_url_plan(output, unit.unit), only_rows, takedowns)
        for sample in fetch_samples(samples, config):  # each decoded while the others download
            downloaded = hashlib.sha256(sample.content).hexdigest() if takedowns.sha256 and sample.content else None
            decode_sample(sample, config)
            takedowns.check(sample, downloaded)
        for name, value in pack(unit.unit, str(row["shard"]), samples).items():
            packed[name].append(value)
    return packed


def filter_and_commit(batch: dict, config: BuildConfig, output_url: str) -> dict:
    """Apply the face filter and commit each unit; returns its status counts."""
    output = Output(output_url)
    done: dict[str, list] = {"unit": [], "counts": [], "error": []}
    for unit, shard, samples in iter_units(batch):
        if config.detector != "none":
            shared_face_hasher().hash_samples(filter_samples(samples, config))  # ~25 ms a kept face (PERFORMANCE.md)
        previous = output.read_table(output.status_path(unit)) if "_" in shard else None
        try:
            counts, error = commit_unit(output, unit, shard, samples, previous), ""
        except OSError as err:  # past the store's retries; raised here, Ray would print the whole traceback
            counts, error = {}, f"{type(err).__name__}: {err}"
        done["unit"].append(unit)
        done["counts"].append(json.dumps(counts))
        done["error"].append(error)
    return done


def fetch_decode_commit(batch: dict, config: BuildConfig, output_url: str, allowlist: np.ndarray | None,
                        takedowns: Takedowns) -> dict:
    """Without a detector, a unit is committed by the task that fetched it: its images never cross
    the object store (that round trip and the commit's own worker cost a fifth of the download
    stage on 2 CPUs, docs/PERFORMANCE.md)."""
    return filter_and_commit(source_fetch_decode(batch, config, output_url, allowlist, takedowns), config, output_url)


def url_candidates(batch: dict, config: BuildConfig, allowlist: np.ndarray | None, takedowns: Takedowns) -> dict:
    """(key, url) of every row that would be fetched, for the URL dedupe plan. One input file per
    row of the batch, read once: a unit alone reads whole row groups, and a LAION part file is one
    row group of ~1M rows, so planning unit by unit would read each file once per unit."""
    allowlist, takedowns = resolved(allowlist), resolved(takedowns)
    out: dict[str, list] = {"key": [], "url": [], "unit": [], "shard": []}
    for file_units in batch["units"]:
        units = [Unit(**fields) for fields in json.loads(file_units)]
        first = units[0].start
        table = read_rows(units[0].path, first, units[-1].stop, list(config.source_columns().values()))
        for unit in units:
            rows = table.slice(unit.start - first, unit.stop - unit.start)
            for sample in unit_samples(unit, rows, config, allowlist, url_duplicates={}, takedowns=takedowns):
                if sample.pending:
                    out["key"].append(sample.key), out["url"].append(sample.url)
                    out["unit"].append(unit.unit), out["shard"].append("")
    return out


# --- the driver ---------------------------------------------------------------------------------

def plan_work(output: Output, units: list[Unit], retry_failed: bool) -> list[Work]:
    """Units without a status file; with retry_failed, also the transient rows of committed ones."""
    committed = {shard_unit(name) for name in output.list("status", ".parquet")}
    work = [Work(u, shard_name(u.unit)) for u in units if u.unit not in committed]
    if retry_failed:
        shards = referenced_shards(output) | {n[:-4] for n in output.list("shards", ".tar")}
        for u in units:
            if u.unit not in committed:
                continue
            status = output.read_table(output.status_path(u.unit), columns=["input_row", "status"])
            failed = [r for r, s in zip(status["input_row"].to_pylist(), status["status"].to_pylist())
                      if s in TRANSIENT_STATUSES]
            if failed:
                attempt = 1 + max((shard_attempt(s) for s in shards if shard_unit(s) == u.unit), default=0)
                work.append(Work(u, shard_name(u.unit, attempt), failed))
    return work


CANDIDATES_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("unit", pa.int64()),
                               ("shard", pa.string())])


def plan_url_dedupe(output: Output, units: list[Unit], config: BuildConfig, allowlist_ref, takedowns_ref) -> int:
    """Plan the URL dedupe over every input row and every sample already written."""
    by_file: dict[int, list[dict]] = {}
    for unit in units:
        by_file.setdefault(unit.file_index, []).append(asdict(unit))
    files = [{"units": json.dumps(file_units)} for file_units in by_file.values()]
    written = dedupe.written_samples(output, ["key", "url", "shard"])  # earlier runs, whatever their input
    if written is not None:
        written = dedupe.map_tables(written, lambda t: dedupe.with_unit(t).select(CANDIDATES_SCHEMA.names))
    if sum(u.stop - u.start for u in units) <= dedupe.LOCAL_ROWS and not isinstance(written, ray.data.Dataset):
        batch = {"units": [f["units"] for f in files]}
        tables = [pa.table(url_candidates(batch, config, allowlist_ref, takedowns_ref), schema=CANDIDATES_SCHEMA)]
        candidates = pa.concat_tables(tables + ([written.cast(CANDIDATES_SCHEMA)] if written is not None else []))
    else:
        candidates = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
            url_candidates, fn_kwargs={"config": config, "allowlist": allowlist_ref, "takedowns": takedowns_ref},
            batch_size=1)
        if written is not None:
            candidates = candidates.union(written if isinstance(written, ray.data.Dataset)
                                          else ray.data.from_arrow(written))
    return dedupe.write_url_plan(output, candidates, partitions=len(units))


def unit_memory(config: BuildConfig) -> int:
    """Memory a fetch task needs: ~600 MB for the worker and one large decoded photo, plus 150 kB
    a row (a web image's size)."""
    return (600 << 20) + min(config.shard_size * 150_000, 4 << 30)


def actor_cpus(actors: int) -> float:
    """CPUs each CPU-only detector actor claims: one, but never so many that the actors hold every
    CPU of the cluster, which would leave the fetch tasks none and hang the run."""
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.1, min(1.0, (total - 1.0) / actors))


def run_units(work: list[Work], output: Output, config: BuildConfig, allowlist_ref, takedowns_ref, use_gpu: bool):
    """Stream the work units through every stage; yields (unit, status counts) as each commits."""
    ds = ray.data.from_items([w.row() for w in work], override_num_blocks=len(work))
    fetch_args = {"config": config, "output_url": output.url, "allowlist": allowlist_ref, "takedowns": takedowns_ref}
    if config.detector == "none":
        ds = ds.map_batches(fetch_decode_commit, batch_size=1, num_cpus=1, memory=unit_memory(config),
                            fn_kwargs=fetch_args)
    else:
        # Reserving memory for a unit's downloads also keeps Ray from fusing this stage into the
        # detector actors, which would leave the actors idle while they download.
        ds = ds.map_batches(source_fetch_decode, batch_size=1, num_cpus=1, memory=unit_memory(config),
                            fn_kwargs=fetch_args)
        gpus = config.detect_gpus if config.detect_gpus is not None else (1.0 if use_gpu else 0.0)
        ds = ds.map_batches(DetectActor, fn_constructor_args=(config, gpus > 0), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=config.detect_actors),
                            num_gpus=gpus, num_cpus=0 if gpus else actor_cpus(config.detect_actors))
        # committing is light work: a fraction of a CPU keeps it from waiting behind the fetch tasks
        ds = ds.map_batches(filter_and_commit, batch_size=1, num_cpus=0.25,
                            fn_kwargs={"config": config, "output_url": output.url})
    for row in ds.iter_rows():
        if row["error"]:  # the unit is not committed: a rerun does it again
            raise StorageError(f"writing unit {row['unit']} to {output.url} failed after the store's retries: "
                               f"{row['error']}")
        yield int(row["unit"]), json.loads(row["counts"])


def remove_taken_down(output: Output, takedowns: Takedowns, timings: dict[str, float]) -> int:
    """Remove what the takedown lists name among the samples earlier runs wrote (this run's never
    reach the shards), before the dedupes, so that they choose their winners among what stays."""
    t0 = time.time()
    found = takedown_removals(output, takedowns)
    removed = 0
    if found is not None and dedupe.count(found):
        removed = dedupe.remove_from_shards(output, found, len(output.list("metadata", ".parquet")))
    timings["takedown_s"] = time.time() - t0
    return removed


def remove_duplicates(output: Output, config: BuildConfig, timings: dict[str, float]) -> tuple[int, int]:
    """The global exact and near dedupe over everything written: both decided, then applied in one
    rewrite of the shards they touch. Returns (exact copies, near-copies and overlaps) removed."""
    t0 = time.time()
    exact = dedupe.duplicate_image_removals(output)
    timings["image_dedupe_s"] = time.time() - t0
    t0 = time.time()
    near = near_duplicate_removals(output, config.near_duplicate_distance, config.exclude_images, config.near_dedupe)
    timings["near_dedupe_s"] = time.time() - t0
    t0 = time.time()
    faces = face_overlap_removals(output, config.near_duplicate_distance, config.exclude_images) \
        if config.exclude_images else None
    timings["face_overlaps_s"] = time.time() - t0
    found = [rows for rows in (exact, near, faces) if rows is not None]
    if not found:
        return 0, 0
    t0 = time.time()
    shards = len(output.list("metadata", ".parquet"))
    removed = dedupe.remove_from_shards(output, dedupe.first_removal_per_key(found, shards), shards)
    timings["dedupe_rewrite_s"] = time.time() - t0
    exact_removed = dedupe.count(exact) if exact is not None else 0
    return exact_removed, removed - exact_removed


def check_output(url: str) -> Output:
    output = Output(url)
    written = output.list("metadata", ".parquet")
    if written:  # a rerun into an output an older version wrote would fail late, in the near dedupe
        with output.fs.open(output.path("metadata", written[0]), "rb") as f:
            found = pq.read_schema(f)
        missing = [name for name in METADATA_SCHEMA.names if name not in found.names]
        version = phash_version(found) or "none"
        if missing or version != PHASH_VERSION:
            problem = f"has no column {', '.join(missing)}" if missing else f"has pHashes of version {version}"
            raise ConfigError(f"output {url} was written by another version: metadata/{written[0]} {problem} "
                              f"(this one writes version {PHASH_VERSION}); delete it or build into a new output")
    try:
        output.make_dirs()
        probe = f".write-test-{uuid.uuid4().hex[:8]}.json"  # its own name: two builds may probe at once
        output.write_json(probe, {})
        output.fs.rm(output.path(probe))
    except OSError as err:
        raise ConfigError(f"output {url} is not writable: {err.strerror or err}") from None
    return output


def start_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=True)


def configure_ray_data(progress_bars: bool) -> None:
    """The driver's Ray Data settings for a build's stages and dedupes (the tests and bench.dedupe_scale
    use them too: the default hash shuffle took 37 s instead of 4 for one small near dedupe)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False
    # Ray Data reserves CPU per operator by default; with the commit stage's share reserved, a
    # 2-CPU machine fetched one unit at a time (docs/PERFORMANCE.md). The detector actors are
    # sized to leave CPU for fetching (actor_cpus), so the reservation is not needed to avoid starvation.
    context.op_resource_reservation_enabled = False
    # the dedupe groupbys shuffle a few small columns: the pull-based sort shuffle starts no
    # aggregator actors, which saves seconds per groupby on small builds
    context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own bar and summary say what matters


@ray.remote(num_cpus=1)
def _warm_up() -> None:
    """Makes a worker import every stage module while the driver plans, instead of when the first
    unit arrives (seconds, on a small build). Explicit, so that it holds however Ray ships this
    function (by value where this module is __main__, and then it imports nothing on its own)."""
    importlib.import_module("pipeline.build")


def warm_up_workers() -> None:
    for _ in range(int(ray.cluster_resources().get("CPU", 1))):
        _warm_up.remote()  # not waited for: a task runs whether or not its result is kept
    # Ray Data starts its stats actor (a new worker process) on a session's first execution, which
    # delayed the first unit by ~1-2 s here; asked for now, it starts while the driver plans. An
    # internal function of the pinned Ray (its own executor calls it), not waited for either.
    get_or_create_stats_actor()


def plan_summary(started: float, timings: dict[str, float], inputs: list[dict], units: list[Unit],
                 work: list[Work], url_duplicates: int, config: BuildConfig) -> dict:
    """What --plan-only returns (and prints): the plan a build would carry out."""
    plan = {"input_files": len(inputs), "input_rows": sum(entry["rows"] for entry in inputs), "units": len(units),
            "rows_per_unit": config.shard_size, "units_to_do": len(work), "url_duplicates_planned": url_duplicates,
            "columns": config.source_columns(),
            "seconds": round(time.time() - started, 2), "stage_seconds": {k: round(v, 2) for k, v in timings.items()}}
    if config.progress:
        print(f"plan only: {plan['input_rows']} rows in {plan['input_files']} files -> {plan['units']} units "
              f"of {config.shard_size} rows "
              f"({plan['units_to_do']} to do), {url_duplicates} URL duplicates planned, in {plan['seconds']:.1f} s; "
              "nothing downloaded", file=sys.stderr)
        print(f"columns: {summary.describe_columns(plan['columns'])}", file=sys.stderr)
    return plan


def build(config: BuildConfig) -> dict:
    """Run (or finish) the build described by config; returns the stats written to OUT/stats.json
    (with plan_only, what plan_summary returns, and nothing is downloaded)."""
    started = time.time()
    paths = expand_inputs(config.input)
    allowlist = load_allowlist(config.sample_ids) if config.sample_ids else None
    takedowns = load_takedowns(config.exclude_urls, config.exclude_hashes, config.near_duplicate_distance)
    exclusion_sets(config.exclude_images)  # a bad --exclude-images fails now, before any work
    if config.detector == "insightface":
        config.insightface_model = str(insightface_model_path(config))
    config = config.with_columns(check_inputs(paths, config))  # every input is checked before anything is written
    output = check_output(config.output)
    lock = OutputLock.claim(output, config.lock_lease)  # before anything is swept, registered or written
    try:
        rows = input_rows([staged_parquet(path, output, config) for path in paths])  # CSV/TSV: converted once
        return build_locked(config, output, lock, rows, allowlist, takedowns, started)
    except KeyboardInterrupt:
        if lock.lost:  # the renewer stopped this build: another one holds the output now
            raise StorageError(lock.lost) from None
        raise
    finally:
        lock.release()


def build_locked(config: BuildConfig, output: Output, lock: OutputLock, rows: dict[str, int],
                 allowlist: np.ndarray | None, takedowns: Takedowns, started: float) -> dict:
    """build()'s work once the inputs are checked and the output is this build's alone."""
    start_ray(config.address)  # before registering: a new output's unit size follows the cluster's CPUs
    warm_up_workers()
    lock.confirm()  # on object storage, after a settling time that starting Ray has mostly spent
    inputs, shard_size = register_inputs(output, rows, config, allowlist, ray.cluster_resources().get("CPU", 1.0))
    config = replace(config, shard_size=shard_size)
    configure_ray_data(config.progress and sys.stderr.isatty())
    output.remove_temporaries()
    remove_orphans(output)
    # removals a killed run decided but did not finish, before anything looks at what is written
    dedupe.apply_removal_plan(output, len(output.list("metadata", ".parquet")))
    units = plan_units(inputs, config.shard_size)
    work = plan_work(output, units, config.retry_failed)
    allowlist_ref = ray.put(allowlist) if allowlist is not None else None
    takedowns_ref = ray.put(takedowns)

    timings, url_duplicates, rows_done = {}, 0, 0
    if work:
        t0 = time.time()
        url_duplicates = plan_url_dedupe(output, units, config, allowlist_ref, takedowns_ref)
        timings["plan_s"] = time.time() - t0
    if config.plan_only:
        return plan_summary(started, timings, inputs, units, work, url_duplicates, config)
    if work:
        t0 = time.time()
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        with tqdm(total=len(work), desc="units", unit="unit", disable=not config.progress, file=sys.stderr) as bar:
            for _, counts in run_units(work, output, config, allowlist_ref, takedowns_ref, use_gpu):
                rows_done += sum(counts.values())
                bar.update(1)
                bar.set_postfix(rows=rows_done, ok=counts.get("ok", 0))
        timings["download_detect_write_s"] = time.time() - t0
    taken_down = remove_taken_down(output, takedowns, timings)
    removed, removed_near = remove_duplicates(output, config, timings)
    # A task that died with its node left what it was writing, which its retry wrote anew: the
    # temporary file, or the tar of a shard it was emptying. Swept as the next run's start would.
    output.remove_temporaries()
    remove_orphans(output)
    stats = summary.finish(output, started, timings, rows_done, len(work), url_duplicates, removed, removed_near,
                           config.source_columns(), taken_down)
    report = write_report(output.url)
    if config.progress:
        print(summary.describe(output, stats, report), file=sys.stderr)
    return stats

