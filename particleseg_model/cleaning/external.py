"""``particleseg clean`` as a RELION External job: the cleaned particles back in the pipeline.

RELION's External job (``relion_gui`` -> External; RELION 3.1 ``RelionJob::
getCommandsExternalJob`` in ``src/pipeline_jobs.cpp``) runs

    <fn_exe> --o External/jobNNN/ --in_parts <particles.star> [--<param_label> <value> ...]
        --j <threads> [other arguments]

from the project directory, and expects the program to write, into the ``--o`` folder,

- its outputs (here ``particles_cleaned.star``, in the input's RELION flavour, plus the score
  table and the report);
- ``RELION_OUTPUT_NODES.star``: a ``data_output_nodes`` loop naming each output with its node
  type, so that the next job can pick it up. RELION 3.1 reads ``_rlnPipeLineNodeName`` and
  ``_rlnPipeLineNodeType`` (an integer; ``NODE_PART_DATA`` = 3 for a particle STAR file,
  ``src/pipeline_jobs.h``); RELION 4 and 5 read ``_rlnPipeLineNodeTypeLabel`` (a label;
  ``LABEL_PARTS_CPIPE`` = ``"ParticlesData.star.relion"``);
- ``RELION_JOB_EXIT_SUCCESS`` when it succeeded, ``RELION_JOB_EXIT_FAILURE`` when it failed
  (the GUI shows the job as finished or failed from these files).

Parameters (RELION's ``Param1..10`` label/value pairs arrive as ``--label value``): ``model``,
``models_root``, ``drop``, ``keep_above``, ``score``, ``batch``, ``on_bad`` as ``particleseg
clean``, and ``relion_version`` (``3.1``, ``4`` or ``5``: which node-type convention to
write; default from the input STAR's stamp: ``5.0`` -> 5, else 3.1, which is also how RELION
4 stamps its files, so RELION 4 users give ``relion_version 4``). ``--j`` sets the TensorFlow
threads. RELION 3.1's ``--pipeline_control`` is accepted and ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from particleseg_model.atomic import atomic_write_text

__all__ = [
    "EXIT_FAILURE",
    "add_external_arguments",
    "EXIT_SUCCESS",
    "OUTPUT_NODES",
    "PARTICLES_LABEL",
    "PARTICLES_NODE_TYPE",
    "external_parser",
    "output_nodes_text",
    "run_external",
]

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
PARTICLES_NODE_TYPE = 3  # RELION 3.1 NODE_PART_DATA
PARTICLES_LABEL = "ParticlesData.star.relion"  # RELION 4/5 LABEL_PARTS_CPIPE
CLEANED_NAME = "particles_cleaned.star"


def output_nodes_text(nodes: Sequence[str], relion_version: str) -> str:
    """The text of ``RELION_OUTPUT_NODES.star`` listing particle STAR files ``nodes`` (paths
    as RELION names them: relative to the project directory), in the convention of
    ``relion_version`` (``"3.1"``: integer node types; ``"4"``/``"5"``: type labels)."""
    modern = not str(relion_version).startswith("3")
    lines = ["", "# version 30001", "", "data_output_nodes", "", "loop_", "_rlnPipeLineNodeName #1"]
    lines.append("_rlnPipeLineNodeTypeLabel #2" if modern else "_rlnPipeLineNodeType #2")
    for node in nodes:
        lines.append(f"{node} {PARTICLES_LABEL if modern else PARTICLES_NODE_TYPE}")
    return "\n".join(lines) + "\n\n"


def add_external_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments RELION's External job passes (see the module docstring)."""
    parser.add_argument("--o", dest="out", required=True, help="the job folder (External/jobNNN/)")
    parser.add_argument("--in_parts", default=None, help="input particles STAR file")
    parser.add_argument("--in_movies", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in_mics", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in_coords", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in_3dref", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in_mask", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--j", type=int, default=1, help="threads (TensorFlow's)")
    parser.add_argument("--pipeline_control", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--models_root", default=None)
    parser.add_argument("--drop", type=float, default=None)
    parser.add_argument("--keep_above", type=float, default=None)
    parser.add_argument("--score", default="centred", choices=["ets", "calibrated", "centred"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--on_bad", default="skip", choices=["skip", "stop"])
    parser.add_argument("--relion_version", default=None, choices=["3.1", "4", "5"])
    return parser


def external_parser() -> argparse.ArgumentParser:
    """A parser of RELION's External-job arguments (:func:`add_external_arguments`)."""
    return add_external_arguments(
        argparse.ArgumentParser(
            prog="particleseg relion-external",
            description="particleSeg cleaning as a RELION External job",
        )
    )


def _marker(job: Path, name: str) -> None:
    job.mkdir(parents=True, exist_ok=True)
    (job / name).write_text("")


def run_external(
    argv: Sequence[str] | argparse.Namespace,
    *,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    cwd: str | os.PathLike | None = None,
) -> int:
    """Run one External job: clean ``--in_parts`` into the ``--o`` folder; 0 on success.

    ``argv``: RELION's arguments, or a namespace parsed by :func:`add_external_arguments`.

    Paths are relative to ``cwd`` (RELION's project directory; default the current one).
    The job folder gets ``particles_cleaned.star``, ``particles_cleaned_scores.parquet``,
    ``report/``, ``RELION_OUTPUT_NODES.star`` and ``RELION_JOB_EXIT_SUCCESS``; on any failure
    one line on ``err`` saying why and ``RELION_JOB_EXIT_FAILURE`` (an earlier marker of the
    other kind is removed first). Without ``--in_parts``: one line naming it, and the failure
    marker.
    """
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        try:
            args = external_parser().parse_args(list(argv))
        except SystemExit as exc:  # argparse printed its usage line; no job folder to mark
            return int(exc.code or 2)
    project = Path(cwd) if cwd is not None else Path.cwd()
    job_name = args.out
    job = project / job_name
    for name in (EXIT_SUCCESS, EXIT_FAILURE):
        (job / name).unlink(missing_ok=True)
    if not args.in_parts:
        err(
            f"particleseg relion-external: error: no --in_parts: give the job an input "
            f"particles STAR file (External job, Input tab, 'Input particles'); {job_name} "
            "marked failed"
        )
        _marker(job, EXIT_FAILURE)
        return 1
    try:
        from particleseg_model.cleaning.clean import clean_star
        from particleseg_model.em.star import read_star

        if args.j and args.j > 0:
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(args.j))
            os.environ.setdefault("OMP_NUM_THREADS", str(args.j))
        star_path = project / args.in_parts
        job.mkdir(parents=True, exist_ok=True)
        version = args.relion_version or ("5" if read_star(star_path).version == "5.0" else "3.1")
        out_star = job / CLEANED_NAME
        result = clean_star(
            star_path,
            out_star,
            model=args.model,
            models_root=args.models_root,
            drop=args.drop,
            keep_above=args.keep_above,
            score=args.score,
            particles_dir=project,  # RELION's image paths start at the project directory
            report_dir=job / "report",
            on_bad=args.on_bad,
            batch=args.batch,
            overwrite=True,
            progress=False,
            log=err,
        )
        node = (Path(job_name) / CLEANED_NAME).as_posix()
        atomic_write_text(job / OUTPUT_NODES, output_nodes_text([node], version))
    except Exception as exc:  # every failure must leave RELION's failure marker
        err(f"particleseg relion-external: error: {exc}")
        if not isinstance(exc, OSError | ValueError):
            err(traceback.format_exc().rstrip())
        _marker(job, EXIT_FAILURE)
        return 1
    _marker(job, EXIT_SUCCESS)
    out(
        f"kept {result.kept}/{result.total} particles ({result.score}, model "
        f"{result.model_version}): {node} (RELION {result.version}); nodes in "
        f"{(Path(job_name) / OUTPUT_NODES).as_posix()}"
    )
    return 0
