# cryofire workflow: simulate (demo) -> preprocess -> backproject -> evaluate, per dataset.
# Datasets and options live in config/config.yaml (validated by workflow/schemas/config.schema.yaml).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/reconstruct.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True
