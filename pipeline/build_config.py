"""Every setting of `python -m pipeline.build_laion_face`, with its documented default."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import ConfigError, option

DETECTORS = ("retinaface", "insightface", "none")
DETECT_BACKENDS = ("auto", "torch", "onnxruntime")
# Our field -> the column LAION-400M's metadata names it ('': LAION-400M has none). Only the URL and
# the caption are required; every other column is read when the input has it and is otherwise null,
# unless a filter reads it (FILTER_COLUMNS).
LAION_COLUMNS = {
    "sample_id": "SAMPLE_ID",
    "url": "URL",
    "caption": "TEXT",
    "width": "WIDTH",
    "height": "HEIGHT",
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
    "nsfw_score": "",
}
REQUIRED_COLUMNS = ("url", "caption")
# A filter's setting -> the fields it reads: the input must have them when the filter is on.
FILTER_COLUMNS = {"sample_ids": ("sample_id",), "drop_nsfw": ("nsfw",), "max_nsfw_score": ("nsfw_score",),
                  "min_similarity": ("similarity",), "min_image_side": ("width", "height")}
# --preset: the column names of the releases users download today (a field not named: not in that
# release), and the filters that make one comparable with LAION's own. `similarity` is always a
# CLIP ViT-B/32 score, as LAION's is; `nsfw_score` a probability, as Re-LAION's `punsafe`.
PRESETS: dict[str, dict] = {
    "laion400m": {"columns": LAION_COLUMNS, "filters": {}},  # LAION-Face kept every row that has a face
    "relaion": {  # Re-LAION-2B-en / Re-LAION-5B research-safe: LAION-5B's columns, unsafe links already removed
        "columns": {"sample_id": "SAMPLE_ID", "url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT",
                    "license": "LICENSE", "nsfw": "NSFW", "similarity": "similarity", "nsfw_score": "punsafe"},
        "filters": {}},
    "datacomp": {  # DataComp CommonPool: unfiltered, so LAION-5B's English CLIP threshold is applied
        "columns": {"url": "url", "caption": "text", "width": "original_width", "height": "original_height",
                    "similarity": "clip_b32_similarity_score"},
        "filters": {"min_similarity": 0.28}},
    "coyo700m": {  # COYO-700M: already filtered for size, NSFW and text by its authors
        "columns": {"sample_id": "id", "url": "url", "caption": "text", "width": "width", "height": "height",
                    "similarity": "clip_similarity_vitb32", "nsfw_score": "nsfw_score_opennsfw2"},
        "filters": {}},
    "cc12m": {"columns": {"url": "url", "caption": "caption"}, "filters": {}},  # two columns, nothing to filter by
}
# The settings that decide what a unit writes: which rows are read and pass the filters, which
# bytes are stored, which faces count. An output holds one value of each (source.register_inputs).
UNIT_SETTINGS = ("sample_id_col", "url_col", "caption_col", "width_col", "height_col", "license_col", "nsfw_col",
                 "similarity_col", "nsfw_score_col", "drop_nsfw", "max_nsfw_score", "min_similarity", "min_image_side", "min_caption_length",
                 "max_bytes", "max_redirects", "respect_optout", "max_image_pixels", "image_max_side", "jpeg_quality",
                 "detector", "detect_size", "min_face_score", "min_face_size")  # + the insightface model's content


@dataclass
class BuildConfig:
    # --- where ---
    input: list[str] = option([], "LAION-style metadata, parquet or CSV/TSV (.gz too): a path, glob or fsspec "
                                  "URL (s3://, gs://); repeatable. None: build the embedded demo")
    output: str = option("out/demo", "output directory or fsspec URL")
    address: str | None = option(None, "join an existing Ray cluster ('auto' or HOST:PORT); default: Ray's own "
                                       "choice: RAY_ADDRESS, else a cluster `ray start` began on this machine, "
                                       "else a new local one")

    # --- source: column names (a preset's, else LAION-400M's) and metadata filters ---
    preset: str | None = option(None, "column names and filters of a known release: " + ", ".join(PRESETS) +
                                " (docs: README, 'Inputs'); flags given beside it win", choices=tuple(PRESETS))
    sample_id_col: str | None = option(None, "column holding the sample id (default: the preset's, else SAMPLE_ID; "
                                             "without one, ids come from the file and row like keys)")
    url_col: str | None = option(None, "column holding the image URL (default: the preset's, else URL)")
    caption_col: str | None = option(None, "column holding the caption (default: the preset's, else TEXT)")
    width_col: str | None = option(None, "column holding the advertised width (default: the preset's, else WIDTH)")
    height_col: str | None = option(None, "column holding the advertised height (default: the preset's, else HEIGHT)")
    license_col: str | None = option(None, "column holding the license (default: the preset's, else LICENSE)")
    nsfw_col: str | None = option(None, "column holding an NSFW tag such as LAION's UNLIKELY/UNSURE/NSFW "
                                        "(default: the preset's, else NSFW)")
    similarity_col: str | None = option(None, "column holding the CLIP ViT-B/32 image-text similarity "
                                              "(default: the preset's, else similarity)")
    nsfw_score_col: str | None = option(None, "column holding an NSFW probability such as Re-LAION's punsafe "
                                              "(default: the preset's, else none)")
    drop_nsfw: list[str] = option([], "NSFW tags to drop, e.g. NSFW and UNSURE; repeatable (LAION-Face kept all)")
    max_nsfw_score: float | None = option(None, "drop rows whose NSFW probability is above this")
    min_similarity: float | None = option(None, "drop rows whose CLIP similarity is below this")
    min_image_side: int | None = option(None, "drop rows whose advertised WIDTH or HEIGHT is below this")
    min_caption_length: int | None = option(None, "drop rows whose caption has fewer characters")
    sample_ids: str | None = option(None, "allow-list of SAMPLE_IDs (text file, one per line, or parquet with a "
                                          "SAMPLE_ID column): only these rows are fetched, e.g. LAION-Face's ID lists")
    exclude_urls: list[str] = option([], "takedown list of URLs (text, one a line): never fetched, and removed where "
                                         "an earlier run wrote them; repeatable", flag="--exclude-urls")
    exclude_hashes: list[str] = option([], "takedown list of images (text, one a line: a sha256 of the image bytes, "
                                           "or a 16-hex pHash matched within near_duplicate_distance): never written, "
                                           "and removed where written; repeatable", flag="--exclude-hashes")
    shard_size: int | None = option(None, "input rows per work unit, so at most this many samples per shard; "
                                          "default: 2 units per cluster CPU, 1,000 to 10,000 rows each; an output "
                                          "keeps the size of its first run")

    # --- fetch ---
    threads_per_task: int = option(32, "concurrent downloads inside one fetch task")
    connect_timeout: float = option(5.0, "seconds to open a connection")
    read_timeout: float = option(10.0, "seconds of silence allowed while reading")
    url_deadline: float = option(30.0, "total seconds per URL, retries and redirects included")
    max_bytes: int = option(20_000_000, "largest response body accepted, enforced while streaming")
    retries: int = option(2, "extra attempts after a timeout, 429, 5xx or connection error")
    retry_backoff: float = option(1.0, "seconds before the first retry; doubles each time")
    max_redirects: int = option(5, "redirect hops followed per URL")
    respect_optout: bool = option(True, "honour X-Robots-Tag noai/noimageai/noindex/noimageindex")
    allow_host: list[str] = option([], "HOST:PORT exempt from the private-address guard; repeatable",
                                   flag="--allow-host")
    respect_robots: bool = option(False, "honour each host's robots.txt (asked once per host and worker; rules "
                                         "for laion-face-builder and for *): rows it disallows get "
                                         "robots_disallowed")
    contact_url: str = option("", "a page about your crawl (purpose, opt-out, contact), named in the User-Agent "
                                  "as polite crawlers do")
    user_agent: str | None = option(None, "User-Agent header sent with every request; default: "
                                          "laion-face-builder/0.1 (+CONTACT_URL; research dataset; honours "
                                          "X-Robots-Tag noai[ and robots.txt])")

    # --- decode ---
    max_image_pixels: int = option(40_000_000, "images with more pixels (read from the header) are refused undecoded")
    image_max_side: int = option(512, "re-encode images whose longer side exceeds this (0: keep every size)")
    jpeg_quality: int = option(95, "JPEG quality when re-encoding")

    # --- detect and filter ---
    detector: str = option("retinaface", "face detector", choices=DETECTORS)
    insightface_model: str = option("~/.insightface/models/buffalo_l/det_10g.onnx",
                                    "insightface detector ONNX file (insightface backend only)")
    detect_size: int = option(640, "images are letterboxed to this square for detection")
    detect_backend: str = option("auto", "what runs the detector: torch (decode, network and NMS on the GPU), "
                                         "onnxruntime, or auto: torch on a GPU, onnxruntime on CPUs",
                                 choices=DETECT_BACKENDS)
    detect_batch_size: int | None = option(None, "images per detector call; default: 256 with torch on a GPU, else 16")
    detect_actors: int = option(1, "detector actors (one per GPU on a GPU cluster)")
    detect_gpus: float | None = option(None, "GPUs per detector actor; default: 1 if the cluster has GPUs, else 0")
    min_face_score: float = option(0.9, "a face counts when its detector score is at least this")
    min_face_size: int = option(32, "... and the shorter side of its box, in original pixels, is at least this")

    # --- quality: near-duplicates and benchmark decontamination ---
    near_dedupe: bool = option(True, "remove near-duplicates (perceptual hashes within near_duplicate_distance)")
    near_duplicate_distance: int = option(6, "largest Hamming distance between one pHash and another image's pHash or crop pHashes")
    exclude_images: list[str] = option([], "folder or glob of benchmark test images (e.g. CelebAMask-HQ, LaPa, 300W, "
                                           "AFLW-19, WFLW test splits) whose near-copies, mirrored too, are removed; "
                                           "repeatable", flag="--exclude-images")

    # --- run ---
    retry_failed: bool = option(False, "re-attempt only rows whose status is a transient failure, add what succeeds")
    plan_only: bool = option(False, "check the inputs, register them, plan the units and the URL dedupe, then stop "
                                    "before any download (a dry run at full size: docs/PERFORMANCE.md)")
    lock_lease: float = option(60.0, "seconds a build's lock on its output (OUT/build.lock) holds without renewal; "
                                     "renewed every quarter of it, taken over by the next build once run out")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        """Fill what was not given: from the preset, its column names (else LAION-400M's) and its
        filters; the User-Agent, from the contact URL."""
        preset = PRESETS.get(self.preset or "laion400m")
        if preset is None:
            return  # validate() names the unknown preset
        for name in LAION_COLUMNS:
            if getattr(self, f"{name}_col") is None:
                setattr(self, f"{name}_col", preset["columns"].get(name, ""))
        for name, value in preset["filters"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.user_agent is None:
            contact = f"+{self.contact_url}; " if self.contact_url else ""
            robots = " and robots.txt" if self.respect_robots else ""
            self.user_agent = f"laion-face-builder/0.1 ({contact}research dataset; honours X-Robots-Tag noai{robots})"

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got '{self.preset}'")
        if self.lock_lease < 4:  # a claim on object storage settles for 2 s before its first renewal
            raise ConfigError("lock_lease must be at least 4 s")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError("shard_size must be at least 1")
        too_small = self.detect_batch_size is not None and self.detect_batch_size < 1
        if too_small or self.detect_actors < 1 or self.threads_per_task < 1:
            raise ConfigError("detect_batch_size, detect_actors and threads_per_task must be at least 1")
        if not self.url_col or not self.caption_col:
            raise ConfigError("url_col and caption_col must name columns")
        for entry in self.allow_host:
            host, _, port = entry.rpartition(":")
            if not host.strip("[]") or not port.isdigit():
                raise ConfigError(f"--allow-host wants HOST:PORT, got '{entry}'")
        if not 0 <= self.near_duplicate_distance <= 12:  # at 12 an image already makes 2,848 band rows
            raise ConfigError("near_duplicate_distance must be between 0 and 12")
        if self.detector not in DETECTORS:
            raise ConfigError(f"detector must be one of {', '.join(DETECTORS)}, got '{self.detector}'")
        if self.detect_backend not in DETECT_BACKENDS:
            raise ConfigError(f"detect_backend must be one of {', '.join(DETECT_BACKENDS)}, got '{self.detect_backend}'")

    def unit_settings(self) -> dict[str, object]:
        settings = {name: sorted(value) if isinstance(value, list) else value
                    for name, value in ((name, getattr(self, name)) for name in UNIT_SETTINGS)}
        if self.detector == "insightface":  # the model by its bytes, wherever the file lies (run after it is fetched)
            model = Path(self.insightface_model).expanduser().read_bytes()
            settings["insightface_model"] = hashlib.sha256(model).hexdigest()[:16]
        return settings

    def source_columns(self) -> dict[str, str]:
        """Our field -> the input's column, for the fields given a column; after source.check_inputs, the
        columns the inputs have (matched there, case aside)."""
        mapping = {name: getattr(self, f"{name}_col") for name in LAION_COLUMNS}
        return {ours: theirs for ours, theirs in mapping.items() if theirs}

    def with_columns(self, columns: dict[str, str]) -> BuildConfig:
        """This config reading exactly `columns` (our field -> the input's column), every other field absent."""
        return replace(self, **{f"{name}_col": columns.get(name, "") for name in LAION_COLUMNS})
