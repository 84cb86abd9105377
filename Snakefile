# cryofire workflow, per dataset: [simulate] -> preprocess -> train -> analyze -> volumes -> report, with a
# consensus backprojection from the input poses as a sanity check and, for simulated datasets, metrics against the
# ground truth. Datasets and options live in config/config.yaml (validated by workflow/schemas/config.schema.yaml).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
