"""Analysis of trained runs: the latent space (PCA, embedding, clusters) and volumes rendered from the decoder."""

from cryofire.analysis.latents import LatentAnalysis as LatentAnalysis
from cryofire.analysis.latents import analyze_latents as analyze_latents
from cryofire.analysis.latents import analyze_run as analyze_run
from cryofire.analysis.latents import fit_pca as fit_pca
from cryofire.analysis.latents import load_latents as load_latents
from cryofire.analysis.latents import pc_trajectory as pc_trajectory
