"""``make demo``: the embedded default run, end to end on this machine.

Builds the simulated demo archive once (three EMPIAR-shaped entries with ground truth, see
:mod:`particleseg_model.simulation.demo_archive`; deterministic, so a later demo reuses it), adds
the embedded EMPIAR fixture catalog to the same mirror, serves it on a free loopback port, points
the clients at it, runs ``catalog_job`` with ``dagster job execute`` on the instance in
``$DAGSTER_HOME``, lets the partition sensor add one partition per eligible entry, builds the
corpus of the two simulated particle entries (``dataset_job``), trains and registers a small
model on one of them (``train_job``; the other map stays unseen), lets the report sensor request
one ``report_job`` per partition, cleans EMPIAR-30002's particle STAR file (``clean_job``), and
prints the eligible entries, the corpus, the IoU table, the cleaning and where everything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    DagsterInstance,
    SensorResult,
    build_sensor_context,
)

from particleseg_assets.definitions import defs
from particleseg_assets.partitions import EMPIAR_PARTITIONS_NAME
from particleseg_assets.resources import EmpiarResource, StorageResource
from particleseg_assets.sensors import (
    dataset_run_key,
    eligible_partitions_sensor,
    empiar_updates_sensor,
    model_reports_sensor,
)
from particleseg_model.access.catalog import read_catalog
from particleseg_model.access.fixtures import write_fixture_mirror
from particleseg_model.access.mirror import Mirror
from particleseg_model.access.server import serve
from particleseg_model.cli import explain_eligible, print_eligible
from particleseg_model.corpus.store import open_corpus
from particleseg_model.em.star import read_star
from particleseg_model.model.registry import latest_model
from particleseg_model.simulation.demo_archive import write_demo_archive


def apply_sensor(instance: DagsterInstance, result) -> None:
    """Do what the daemon does with a sensor's dynamic-partition requests."""
    if not isinstance(result, SensorResult):
        return
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)


DEMO_ENTRIES = ("EMPIAR-30001", "EMPIAR-30002", "EMPIAR-30003")
DATASET_DEMO_KEYS = ("30001", "30002")
# The model shipped in the package fine-tuned on EMPIAR-30001 (a few minutes on two cores), so
# that the demo cleans with what a user gets, whichever maps the archive was simulated from
# (the real ones of ../shared or generated ones); 30002 is never trained on, so its report is
# the unseen-map figure.
DEMO_TRAINING = {"holdout": ["30002"], "epochs": 6, "mode": "pretrained", "arch": "unet"}
# 2D classification of the cleaned demo set (600 particles) before/after/random drop: K=4 and 6
# iterations keep it to minutes on two cores (benchmarks/classify_2d.py is the full experiment)
DEMO_CLASSIFY = {"classify": 4, "classify_iterations": 6}


def sensor_run_tags(sensor_name: str, run_key: str, partition: str) -> dict[str, str]:
    """The tags a run requested by ``sensor_name`` gets from the daemon: a run the demo launches
    itself for a sensor's request carries them too, so that the daemon of the first
    ``make dev`` finds the run key done (its dedupe looks up ``dagster/run_key`` with
    ``dagster/sensor_name``) and does not launch the same run again."""
    return {
        "dagster/partition": partition,
        "dagster/run_key": run_key,
        "dagster/sensor_name": sensor_name,
    }


def demo_clean_star(mirror_dir: Path) -> Path:
    """The particle STAR file the demo cleans: EMPIAR-30002's, 30% junk of six kinds."""
    return mirror_dir / "archive" / "30002" / "data" / "particles.star"


def run_job(
    storage: StorageResource, env: dict, step: str, log_name: str, job: str, *args: str
) -> int:
    """``dagster job execute`` of one job on the demo instance, logged to a file; on failure
    the end of the log is printed."""
    log_path = storage.path("demo", f"{log_name}.log")
    command = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "execute",
        "-m",
        "particleseg_assets.definitions",
        "-j",
        job,
        *args,
    ]
    print(f"[{step}] {' '.join(command[2:])}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        print(Path(log_path).read_text()[-4000:], file=sys.stderr)
        print(f"{job} failed (exit {code}); log: {log_path}", file=sys.stderr)
    return code


def demo_mirror(mirror_dir: Path) -> tuple[Mirror, str]:
    """The simulated archive (built when missing, else reused) plus the fixture catalog."""
    if set(DEMO_ENTRIES) <= set(Mirror(mirror_dir).entry_ids()):
        how = "reused"
    else:
        if mirror_dir.exists() and not any(mirror_dir.iterdir()):
            mirror_dir.rmdir()
        begun = time.perf_counter()
        write_demo_archive(mirror_dir)
        how = f"simulated in {time.perf_counter() - begun:.1f} s"
    return write_fixture_mirror(mirror_dir), how


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set: run through `make demo`", file=sys.stderr)
        return 2
    storage = StorageResource()
    mirror_dir = storage.path("demo", "archive")
    started = time.perf_counter()
    mirror, how = demo_mirror(mirror_dir)
    print(
        f"[1/8] demo mirror: {len(mirror.entry_ids())} EMPIAR entries in {mirror_dir} "
        f"({', '.join(DEMO_ENTRIES)} {how}, with ground truth and galleries; "
        f"the rest is the embedded catalog fixture)"
    )

    with serve(mirror_dir) as server:
        env = {**os.environ, **server.env(), "PARTICLESEG_DATA": str(storage.base())}
        os.environ.update(server.env())
        print(f"[2/8] local EMPIAR/EMDB server at {server.url}")
        code = run_job(storage, env, "3/8", "catalog_job", "catalog_job")
        if code:
            return code

        instance = DagsterInstance.get()
        resources = {"storage": storage, "empiar": EmpiarResource()}
        with build_sensor_context(
            instance=instance, resources=resources, definitions=defs
        ) as context:
            result = eligible_partitions_sensor(context)
            apply_sensor(instance, result)
        requested = [r.partition_key for r in getattr(result, "run_requests", None) or []]
        with build_sensor_context(
            instance=instance, resources=resources, definitions=defs
        ) as context:
            tick = empiar_updates_sensor(context)
        partitions = instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME)
        print(
            f"[4/8] partition sensor: {len(partitions)} empiar_id partitions, "
            f"{len(requested)} dataset_job runs requested (run keys dataset-<id>; "
            f"{'this instance had them all already' if not requested else 'new partitions'})"
            f"; updates sensor: "
            f"{getattr(tick, 'skip_message', None) or 'new entries found'}"
        )

        # The two simulated particle entries go into the corpus here (their poses are
        # deposited). The micrograph entry needs a RELION refinement (over an hour on two
        # cores) and the fixture entries are real EMPIAR ids whose files the demo mirror lacks:
        # their partitions exist, their runs are one command away (printed below).
        for key in DATASET_DEMO_KEYS:
            tags = sensor_run_tags(eligible_partitions_sensor.name, dataset_run_key(key), key)
            code = run_job(
                storage,
                env,
                "5/8",
                f"dataset_job_{key}",
                "dataset_job",
                "--tags",
                json.dumps(tags),
            )
            if code:
                return code

    # The model: trained on EMPIAR-30001, with 30002 (another map) held out as the unseen
    # dataset; then the report sensor asks for one IoU report per partition with a corpus.
    config_path = storage.path("demo", "train_config.yaml")
    config_path.write_text(
        json.dumps({"ops": {"segmentation_model": {"config": DEMO_TRAINING}}}, indent=2) + "\n"
    )
    code = run_job(storage, env, "6/8", "train_job", "train_job", "--config", str(config_path))
    if code:
        return code
    with build_sensor_context(instance=instance, definitions=defs) as context:
        reports = model_reports_sensor(context)
    for request in getattr(reports, "run_requests", None) or []:
        tags = sensor_run_tags(model_reports_sensor.name, request.run_key, request.partition_key)
        code = run_job(
            storage,
            env,
            "7/8",
            f"report_job_{request.partition_key}",
            "report_job",
            "--tags",
            json.dumps(tags),
        )
        if code:
            return code

    # Cleaning: the simulated particle set of EMPIAR-30002 (30% junk), as a user's STAR file
    clean_path = storage.path("demo", "clean_config.yaml")
    clean_path.write_text(
        json.dumps(
            {
                "ops": {
                    "cleaned_particles": {
                        "config": {
                            "star": str(demo_clean_star(mirror_dir)),
                            "drop": 0.3,
                            "score": "centred",
                            "name": "EMPIAR-30002",
                            # the paper's test, small: RELION 2D classification before,
                            # after and after a random drop (DEMO_CLASSIFY)
                            **DEMO_CLASSIFY,
                        }
                    }
                }
            },
            indent=2,
        )
        + "\n"
    )
    code = run_job(storage, env, "8/8", "clean_job", "clean_job", "--config", str(clean_path))
    if code:
        return code

    catalog = read_catalog(storage.catalog_path())
    eligible = read_catalog(storage.eligible_path())
    errors = catalog[catalog["error"].fillna("") != ""]
    print(
        f"\n{len(eligible)} eligible of {len(catalog)} EMPIAR entries "
        f"(best EMDB map better than 3.5 A, particles or coordinates deposited):\n"
    )
    print_eligible(eligible)
    print("\n" + "\n".join(explain_eligible(catalog, eligible)))
    if len(errors):
        print(f"\n{len(errors)} entries carry an error (kept, not eligible):")
        for row in errors.itertuples(index=False):
            print(f"  {row.error}")
    last = instance.fetch_materializations(AssetKey("empiar_entries"), limit=1).records
    if last:
        reported = last[0].asset_materialization.metadata["error_list"].value
        print(f"\nproblems the last catalog run reported (the rest refreshed):\n{reported}")
    print("\ncorpus (labels from the projected mask at each particle's pose):")
    for key in DATASET_DEMO_KEYS:
        corpus = open_corpus(storage.corpus_root(), key)
        labels = corpus.labels[:]
        share = np.bincount(labels.ravel(), minlength=3) / labels.size
        splits = corpus.table["split"].value_counts().to_dict()
        print(
            f"  EMPIAR-{key}: {corpus.n_particles} particles at {corpus.box} px, "
            f"background/signal/edge {share[0]:.2f}/{share[1]:.2f}/{share[2]:.2f}, "
            f"splits {splits}\n    {corpus.location}\n    "
            f"{storage.path('particle_masks', key, 'particles_with_masks.png')}"
        )
    version = latest_model(storage.models_root())
    manifest = version.manifest
    if manifest.get("parent") and manifest.get("new_partitions"):
        # fine-tuned: the parent's 28 partitions would hide the one it was tuned on
        trained = f"fine-tuned from {manifest['parent']} on {', '.join(manifest['new_partitions'])}"
    else:
        trained = f"{manifest['mode']} training on {', '.join(manifest['partitions'])}"
    print(
        f"\nmodel {version.version} ({manifest['arch']} network, {manifest['input_size']} px, "
        f"{trained}, {manifest['epochs_run']} epochs, {manifest['train_images_per_s']} "
        f"images/s): {version.path}\n  training curve {version.path / 'training_curve.png'}"
    )
    print("\nIoU reports of the latest model on each dataset's test split (x100, as the paper):")
    print(
        f"  {'entry':<13}{'seen':<7}{'test':>6}{'mean IoU':>10}{'backgr.':>9}{'signal':>8}"
        f"{'edge':>7}{'pixel acc.':>12}{'good only':>11}"
    )
    for key in DATASET_DEMO_KEYS:
        report = json.loads(storage.path("iou_reports", key, "report.json").read_text())
        print(
            f"  EMPIAR-{key:<6}{'yes' if report['seen_in_training'] else 'no':<7}"
            f"{report['test_particles']:>6}{report['mean_iou']:>10.2f}"
            f"{report['iou_background']:>9.2f}{report['iou_signal']:>8.2f}"
            f"{report['iou_edge']:>7.2f}{report['pixel_accuracy']:>12.2f}"
            f"{report.get('mean_iou_good', float('nan')):>11.2f}   "
            f"{storage.path('iou_reports', key, 'overlay.png')}"
        )
    print(
        "  (good only: the mean IoU over the particles the simulation made good; a junk "
        "particle's label\n  is the mask of a pose that is not in its image)"
    )
    cleaned = read_star(storage.path("cleaned", "EMPIAR-30002", "particles_cleaned.star"))
    truth = pd.read_csv(demo_clean_star(mirror_dir).parent / "ground_truth.csv").set_index(
        "image_name"
    )["is_good"]
    before = read_star(demo_clean_star(mirror_dir)).particles["image_name"]
    after = cleaned.particles["image_name"]
    dropped = before[~before.isin(set(after))]
    report = storage.path("cleaned", "EMPIAR-30002", "report")
    print(
        f"\ncleaning EMPIAR-30002 (clean_job, centred score, drop 30%): {len(before)} -> "
        f"{len(after)} particles; good share {truth.loc[before].mean():.1%} -> "
        f"{truth.loc[after].mean():.1%}; {(~truth.loc[dropped]).mean():.1%} of the dropped "
        f"particles are junk\n  cleaned STAR {storage.path('cleaned', 'EMPIAR-30002')}/"
        f"particles_cleaned.star\n  report {report}/score_histogram.png, gallery.png"
    )
    summary = storage.path("cleaned", "EMPIAR-30002", "classify", "summary.csv")
    if summary.is_file():
        table = pd.read_csv(summary)
        print(
            f"\n2D classification (RELION, K={DEMO_CLASSIFY['classify']}, "
            f"{DEMO_CLASSIFY['classify_iterations']} iterations) before / after cleaning / after "
            "a random drop of as many:"
        )
        for row in table.to_dict(orient="records"):
            print(
                f"  {row['condition']:<12}{row['particles']:>5} particles, "
                f"{row.get('particles_in_good_classes', 0)} in good classes "
                f"({100 * row.get('good_class_share', 0):.1f}%), largest class "
                f"{100 * row['largest_class_share']:.0f}%, {row['seconds']:.0f} s"
            )
        print(f"  class averages side by side: {summary.parent / 'galleries.png'}")
    print(
        "\nsegment or clean your own particles with it:\n  .venv/bin/particleseg segment "
        "particles.star --out labels.zarr\n  .venv/bin/particleseg clean particles.star "
        "--drop 0.3 --out cleaned.star --report report/"
    )
    print(
        "\nany partition from the command line (30003, the micrograph entry, runs RELION "
        "extraction and\n3D auto-refine: over an hour on 2 cores), with the demo archive "
        "served in another shell by `make serve`:\n"
        '  eval "$(make -s env)"\n'
        "  .venv/bin/dagster job execute -m particleseg_assets.definitions -j dataset_job "
        '--tags \'{"dagster/partition": "30001"}\''
    )
    print(
        f"\ncatalog:   {storage.catalog_path()}\neligible:  {storage.eligible_path()}"
        f"\ninstance:  {os.environ['DAGSTER_HOME']} (see it with `make dev`)"
        f"\ndone in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
