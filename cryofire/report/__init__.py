"""The run report: one self-contained HTML page (figures embedded) and a ChimeraX script for the state volumes.

Reads run folders and the outputs of `cryofire analyze`, `volume` and `evaluate`; never trains.
"""

from cryofire.report.build import chimerax_script as chimerax_script
from cryofire.report.build import render_report as render_report
from cryofire.report.build import write_report as write_report
from cryofire.report.inputs import ReportInputs as ReportInputs
from cryofire.report.inputs import gather_inputs as gather_inputs
