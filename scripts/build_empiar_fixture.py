"""Regenerate particleseg_model/access/data/empiar_fixture.json from ../shared/data/empiar.

The fixture holds public facts only (EMPIAR ids, titles, dataset sizes, EMDB ids, best
resolutions of the original particleSeg list; the header of EMPIAR-10934), shaped as the
EMPIAR and EMDB APIs return them, plus synthetic entries (ids 19001+, titles starting with
"[fixture]") that are not eligible or malformed on purpose. Imagesets of the 56 original
entries are illustrative: the list says they ship particles or coordinates, not how; except
those of EMPIAR-10028, whose folders, files and box come from public material (below), as do
the imagesets of EMPIAR-10076 and EMPIAR-10017 (entries outside the original list, no EMDB
link known, so never eligible here).

The JSON's ``provenance`` says, entry by entry, which facts are real and where each came from,
and which are synthetic (``"status"``: ``real``, ``partly real`` or ``synthetic``).

    python scripts/build_empiar_fixture.py ../shared/data/empiar
"""

from __future__ import annotations

import ast
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from particleseg_model.access.fixtures import emdb_record

NS = {"e": "http://pdbe.org/empiar"}


def particles_imageset(name: str, n: int, pixel: float) -> dict:
    return {
        "name": name,
        "directory": "data/Particles",
        "category": "picked particles - single frame - processed",
        "header_format": "MRCS",
        "data_format": "MRCS",
        "num_images_or_tilt_series": n,
        "frames_per_image": 1,
        "voxel_type": "32 BIT FLOAT",
        "pixel_width": pixel,
        "image_width": "256",
        "image_height": "256",
        "details": "Extracted particles and their RELION STAR file.",
        "micrographs_file_pattern": "",
        "picked_particles_file_pattern": "",
        "picked_particles_directory": "",
    }


def micrographs_imageset(name: str, n: int, pixel: float, coordinates: bool) -> dict:
    return {
        "name": name,
        "directory": "/data/Micrographs",
        "category": "micrographs - multiframe",
        "header_format": "TIFF",
        "data_format": "TIFF",
        "num_images_or_tilt_series": n,
        "frames_per_image": 40,
        "voxel_type": "UNSIGNED BYTE",
        "pixel_width": pixel,
        "image_width": "5760",
        "image_height": "4092",
        "details": "Dose-fractionated movies.",
        "micrographs_file_pattern": "data/Micrographs/*.tif",
        "picked_particles_file_pattern": "data/Coordinates/*.star" if coordinates else "",
        "picked_particles_directory": "data/Coordinates" if coordinates else "",
    }


def entry(
    title,
    size,
    emdb,
    imagesets,
    *,
    status="REL",
    release="2019-06-01",
    update=None,
    xref_shape="object",
    experiment="EMDB",
) -> dict:
    xrefs = [{"name": e} for e in emdb] if xref_shape == "object" else list(emdb)
    return {
        "title": title,
        "status": status,
        "release_date": release,
        "update_date": update or release,
        "dataset_size": size,
        "experiment_type": experiment,
        "cross_references": xrefs,
        "citation": [],
        "imagesets": imagesets,
    }


def main(shared_empiar: Path, out: Path) -> None:
    entries: dict[str, dict] = {}
    emdb: dict[str, dict] = {}
    with open(shared_empiar / "particleseg_trimmed_empiar_data.csv", newline="") as f:
        for i, row in enumerate(sorted(csv.DictReader(f), key=lambda r: int(r["empiar_ids"]))):
            ids = ast.literal_eval(row["emdb_ids"])
            best = row["best_resolutions"]
            title = row["title"]
            n = 5000 + 1000 * i
            if "particle" in title.lower() or i % 2 == 0:
                sets = [particles_imageset(f"Particles of {title[:60]}", n, 1.06)]
            else:
                sets = [
                    micrographs_imageset(
                        f"Micrographs of {title[:60]}", n // 100, 1.06, coordinates=True
                    )
                ]
            # Release dates spread over 2016-2021 so incremental windows have something to cut.
            release = f"{2016 + i % 6}-{1 + i % 12:02d}-{1 + i % 28:02d}"
            entries[f"EMPIAR-{row['empiar_ids']}"] = entry(
                title,
                row["dataset_sizes"],
                ids,
                sets,
                release=release,
                xref_shape="object" if i % 3 else "string",
            )
            for j, emd in enumerate(ids):
                # Only the best resolution is known; other maps of the entry get coarser ones.
                value = best if j == 0 else f"{float(best) + 0.2 + 0.1 * j:.2f}"
                emdb.setdefault(emd, emdb_record(value))

    root = ET.parse(shared_empiar / "EMPIAR-10934.xml").getroot()
    admin = root.find("e:admin", NS)
    image_set = root.find("e:imageSet", NS)
    dims = image_set.find("e:dimensions", NS)
    size = admin.find("e:datasetSize", NS)
    real = {
        "title": admin.findtext("e:title", namespaces=NS),
        "status": admin.findtext("e:currentStatus", namespaces=NS),
        "release_date": admin.findtext("e:keyDates/e:releaseDate", namespaces=NS),
        "update_date": admin.findtext("e:keyDates/e:updateDate", namespaces=NS),
        "dataset_size": f"{size.text} {size.get('units')}",
        "experiment_type": admin.findtext("e:experimentType", namespaces=NS),
        "cross_references": [
            {"name": e.text}
            for e in root.findall("e:crossReferences/e:relatedEMDBEntries/e:emdbEntry", NS)
        ],
        "citation": [{"doi": "10.1038/s41467-021-26251-6"}],
        "imagesets": [
            {
                "name": image_set.findtext("e:name", namespaces=NS),
                "directory": image_set.findtext("e:directory", namespaces=NS),
                "category": image_set.findtext("e:category", namespaces=NS),
                "header_format": image_set.findtext("e:headerFormat", namespaces=NS),
                "data_format": image_set.findtext("e:dataFormat", namespaces=NS),
                "num_images_or_tilt_series": int(
                    image_set.findtext("e:numImagesOrTiltSeries", namespaces=NS)
                ),
                "frames_per_image": int(image_set.findtext("e:framesPerImage", namespaces=NS)),
                "voxel_type": image_set.findtext("e:voxelType", namespaces=NS),
                "pixel_width": float(dims.findtext("e:pixelWidth", namespaces=NS)),
                "image_width": dims.findtext("e:imageWidth", namespaces=NS),
                "image_height": dims.findtext("e:imageHeight", namespaces=NS),
                "details": image_set.findtext("e:details", namespaces=NS),
                "micrographs_file_pattern": image_set.findtext(
                    "e:micrographsFilePattern", namespaces=NS
                ),
                "picked_particles_file_pattern": image_set.findtext(
                    "e:pickedParticlesFilePattern", namespaces=NS
                )
                or "",
                "picked_particles_directory": image_set.findtext(
                    "e:pickedParticlesDirectory", namespaces=NS
                )
                or "",
            }
        ],
    }
    entries["EMPIAR-10934"] = real
    emdb["EMD-12602"] = emdb_record("3.2")  # illustrative; 10934 fails on particles, not maps

    provenance = {
        "_about": (
            "Which facts of each entry are real and where they come from. Fields not listed "
            "under real_facts are synthetic (illustrative). Sources: the original particleSeg "
            "list (../shared/data/empiar/particleseg_trimmed_empiar_data.csv), the EMPIAR-10934 "
            "XML (../shared/data/empiar/EMPIAR-10934.xml), cryoDRGN's EMPIAR scripts "
            "(github.com/zhonge/cryodrgn_empiar) and test data (ml-struct-bio/cryodrgn "
            "tests/data, in ../shared/data/real), CryoSegNet's EMPIAR-10017 data "
            "(../shared/data/real/cryosegnet_empiar10017)."
        ),
    }
    original_list = "../shared/data/empiar/particleseg_trimmed_empiar_data.csv"
    for key in entries:
        provenance[key] = {
            "status": "partly real",
            "real_facts": {
                "title": original_list,
                "dataset_size": original_list,
                "cross_references": original_list,
                "resolution of the first EMDB map (the best)": original_list,
            },
            "synthetic_facts": [
                "release_date",
                "update_date",
                "imagesets",
                "resolutions of the other EMDB maps",
            ],
        }
    provenance["EMPIAR-10934"] = {
        "status": "real",
        "real_facts": {"header and imageset": "../shared/data/empiar/EMPIAR-10934.xml"},
        "synthetic_facts": ["EMD-12602 resolution (3.2, illustrative)"],
    }

    cryodrgn_10028 = "github.com/zhonge/cryodrgn_empiar empiar10028/ (README, download script)"
    cryodrgn_10076 = "github.com/zhonge/cryodrgn_empiar empiar10076/inputs/README"
    test_10076 = "../shared/data/real/cryodrgn_empiar10076 (cryoDRGN tests/data/empiar_10076_7.*)"
    # EMPIAR-10028: the particle STAR and stack folders cryoDRGN downloads, the box it uses;
    # micrograph movies under data/Micrographs/Micrographs_part1|2
    record = entries["EMPIAR-10028"]
    record["imagesets"] = [
        {
            **particles_imageset("Particles of the Pf80S ribosome", 5000 + 1000 * 1, 1.06),
            "directory": "data/Particles",
            "image_width": "360",
            "image_height": "360",
            "details": "Polished particles: shiny_2sets.star with stacks in MRC_0601/, MRC_1901/.",
            "picked_particles_file_pattern": "data/Particles/shiny_2sets.star",
        },
        {
            **micrographs_imageset("Micrograph movies", 60, 1.06, coordinates=False),
            "directory": "data/Micrographs",
            "header_format": "MRCS",
            "data_format": "MRCS",
            "micrographs_file_pattern": "data/Micrographs/Micrographs_part*/*_movie.mrcs",
        },
    ]
    provenance["EMPIAR-10028"] = {
        "status": "partly real",
        "real_facts": {
            **provenance["EMPIAR-10028"]["real_facts"],
            "particles directory data/Particles, shiny_2sets.star, MRC_0601/, MRC_1901/": (
                cryodrgn_10028
            ),
            "particle box 360 px (parse_pose_csparc -D 360)": cryodrgn_10028,
            "micrographs under data/Micrographs/Micrographs_part1|2 (e.g. 004_movie.mrcs)": (
                "public download scripts citing "
                "ftp.ebi.ac.uk/empiar/world_availability/10028/data/Micrographs/"
            ),
        },
        "synthetic_facts": [
            "release_date",
            "update_date",
            "imageset names and categories (inferred from the files)",
            "num_images_or_tilt_series",
            "pixel_width",
            "frames_per_image",
            "resolutions of the other EMDB maps",
        ],
    }
    # EMPIAR-10076: one deposited particle stack and a RELION 3.0 STAR file
    entries["EMPIAR-10076"] = entry(
        "[partly synthetic] Bacterial 50S ribosome assembly intermediates (L17-depleted)",
        None,
        [],
        [
            {
                **particles_imageset("Particles", 131_899, 1.31),
                "directory": "data",
                "category": "picked particles - single frame - unprocessed",
                "header_format": "MRC",
                "data_format": "MRC",
                "image_width": "320",
                "image_height": "320",
                "details": "Particle stack L17Combine_weight_local.mrc; CTF in Parameters.star.",
                "picked_particles_file_pattern": "data/Parameters.star",
            }
        ],
        release="2017-05-01",
    )
    provenance["EMPIAR-10076"] = {
        "status": "partly real",
        "real_facts": {
            "particle stack data/L17Combine_weight_local.mrc, STAR Parameters.star": (
                cryodrgn_10076
            ),
            "box 320 px": f"{cryodrgn_10076} (-D 320); {test_10076}",
            "pixel 1.31 A (rlnDetectorPixelSize 5 um / rlnMagnification 38168)": test_10076,
            "RELION 3.0 STAR (data_ block, no optics)": test_10076,
        },
        "synthetic_facts": [
            "title wording",
            "release_date",
            "update_date",
            "dataset_size (unknown)",
            "cross_references (no EMDB link known: not eligible here)",
            "num_images_or_tilt_series (131899, unverified)",
            "category (inferred: raw extracted particles)",
            "Parameters.star location (data/ assumed)",
        ],
    }
    # EMPIAR-10017: beta-galactosidase micrographs (Falcon II, 4096 px, 1.77 A/px)
    entries["EMPIAR-10017"] = entry(
        "[partly synthetic] Beta-galactosidase micrographs (Falcon II)",
        None,
        [],
        [
            {
                **micrographs_imageset("Micrographs", 84, 1.77, coordinates=False),
                "category": "micrographs - single frame",
                "header_format": "MRC",
                "data_format": "MRC",
                "frames_per_image": 1,
                "voxel_type": "32 BIT FLOAT",
                "image_width": "4096",
                "image_height": "4096",
                "details": "",
                "micrographs_file_pattern": "data/Micrographs/*.mrc",
            }
        ],
        release="2015-03-01",
    )
    provenance["EMPIAR-10017"] = {
        "status": "partly real",
        "real_facts": {
            "beta-galactosidase, Falcon II, 4096 x 4096 px, 1.77 A/px": (
                "../shared/data/real/README.md (CryoSegNet finetune_dataset, CryoPPP picks)"
            ),
        },
        "synthetic_facts": [
            "title wording",
            "release_date",
            "update_date",
            "dataset_size (unknown)",
            "cross_references (no EMDB link known: not eligible here)",
            "num_images_or_tilt_series (84, unverified)",
            "category, directory and file pattern",
            "coordinates: none declared (whether EMPIAR-10017 deposits any is not known here)",
        ],
    }

    p = particles_imageset
    m = micrographs_imageset
    synthetic = {
        "EMPIAR-19001": (
            entry(
                "[fixture] obsolete entry",
                "12 GB",
                ["EMD-90001"],
                [p("particles", 9000, 1.1)],
                status="OBSOLETE",
            ),
            {"EMD-90001": "2.9"},
        ),
        "EMPIAR-19002": (
            entry("[fixture] map too coarse", "40 GB", ["EMD-90002"], [p("particles", 9000, 1.1)]),
            {"EMD-90002": "4.2"},
        ),
        "EMPIAR-19003": (
            entry(
                "[fixture] resolution with a unit",
                "3.5 TB",
                ["EMD-90003"],
                [p("particles", 9000, 0.83)],
            ),
            {"EMD-90003": "3.1 Å"},
        ),
        "EMPIAR-19004": (
            entry(
                "[fixture] map without a resolution",
                "1 TB",
                ["EMD-90004"],
                [p("particles", 9000, 1.1)],
            ),
            {"EMD-90004": None},
        ),
        "EMPIAR-19005": (
            entry(
                "[fixture] resolution that does not parse",
                "1 TB",
                ["EMD-90005"],
                [p("particles", 9000, 1.1)],
            ),
            {"EMD-90005": "n/a"},
        ),
        "EMPIAR-19006": (
            entry(
                "[fixture] map missing from EMDB",
                "1 TB",
                ["EMD-90006"],
                [p("particles", 9000, 1.1)],
            ),
            {},
        ),
        "EMPIAR-19007": (
            {
                "title": "[fixture] malformed imagesets",
                "status": "REL",
                "release_date": "2020-01-01",
                "update_date": "2020-01-01",
                "dataset_size": "1 TB",
                "cross_references": [{"name": "EMD-90007"}],
                "imagesets": "not a list",
            },
            {"EMD-90007": "2.5"},
        ),
        "EMPIAR-19008": (
            entry(
                "[fixture] tomography",
                "2 TB",
                ["EMD-90008"],
                [{**m("tilt series", 60, 1.3, False), "category": "tilt series"}],
                experiment="EMDB",
            ),
            {"EMD-90008": "3.3"},
        ),
        "EMPIAR-19009": (
            entry(
                "[fixture] string cross-references",
                "800 GB",
                ["EMD-90009"],
                [p("particles", 20000, 1.0)],
                xref_shape="string",
            ),
            {"EMD-90009": "2.8"},
        ),
        "EMPIAR-19010": (
            entry(
                "[fixture] micrographs with coordinates",
                "3 TB",
                ["EMD-90010"],
                [m("micrographs", 900, 1.0, True)],
            ),
            {"EMD-90010": "3.0"},
        ),
        "EMPIAR-19011": (
            entry("[fixture] no EMDB map", "900 GB", [], [p("particles", 9000, 1.1)]),
            {},
        ),
        "EMPIAR-19012": (
            entry(
                "[fixture] micrographs only",
                "5 TB",
                ["EMD-90012"],
                [m("micrographs", 900, 1.0, False)],
            ),
            {"EMD-90012": "2.2"},
        ),
        "EMPIAR-19013": (
            entry(
                "[fixture] coordinates only in free text",
                "2 TB",
                ["EMD-90013"],
                [{**m("micrographs", 900, 1.0, False), "details": "Coordinates not deposited."}],
            ),
            {"EMD-90013": "2.6"},
        ),
        "EMPIAR-19014": (
            entry(
                "[fixture] particle movies only",
                "6 TB",
                ["EMD-90014"],
                [
                    {
                        **p("particle movies", 9000, 1.1),
                        "category": "picked particles - multiframe - unprocessed",
                        "frames_per_image": 40,
                    }
                ],
            ),
            {"EMD-90014": "2.7"},
        ),
        "EMPIAR-19015": (
            entry(
                "[fixture] subtomogram averaging with picked particles",
                "4 TB",
                ["EMD-90015"],
                [
                    {**m("tilt series", 60, 1.3, False), "category": "tilt series"},
                    p("subtomogram particles", 9000, 1.3),
                ],
            ),
            {"EMD-90015": "3.0"},
        ),
    }
    for key, (record, maps) in synthetic.items():
        entries[key] = record
        provenance[key] = {"status": "synthetic", "real_facts": {}, "synthetic_facts": ["all"]}
        for emd, value in maps.items():
            emdb[emd] = emdb_record(value)

    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"entries": entries, "emdb": emdb, "provenance": provenance}
    out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {len(entries)} entries, {len(emdb)} EMDB maps")


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[1]
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "shared" / "data" / "empiar"
    main(src, here / "particleseg_model" / "access" / "data" / "empiar_fixture.json")
