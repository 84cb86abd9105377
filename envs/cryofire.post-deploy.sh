#!/usr/bin/env bash
# Run by Snakemake (--use-conda) once, inside the environment it has just created from cryofire.yaml: installs the
# cryofire package, with its dependencies, from this checkout. Snakemake runs a copy of this file from its working
# directory, so the checkout is looked for there and in the folders above it; set CRYOFIRE_SOURCE to the checkout
# when the working directory (--directory) is outside it.
# (A `-e ..` line in cryofire.yaml would not do: Snakemake builds from a copy of the file in .snakemake/conda/, and
# conda resolves pip paths from the folder of that copy.)
set -euo pipefail
source_dir="${CRYOFIRE_SOURCE:-$PWD}"
until grep -qs '^name = "cryofire"' "$source_dir/pyproject.toml"; do
    if [ "$source_dir" = / ]; then
        echo "no cryofire checkout in ${CRYOFIRE_SOURCE:-$PWD} or above it: set CRYOFIRE_SOURCE" >&2
        exit 1
    fi
    source_dir=$(dirname "$source_dir")
done
python -m pip install -e "$source_dir"
