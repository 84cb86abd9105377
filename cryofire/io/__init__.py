"""File input and output: MRC volumes and stacks, RELION STAR, cryoSPARC .cs, the lazy image source.

Readers return the particle table of docs/conventions.md (a pandas DataFrame) and numpy arrays;
this layer knows nothing of training and does not import torch.
"""

from cryofire.io.cryosparc import read_cs as read_cs
from cryofire.io.mrc import StackLayout as StackLayout
from cryofire.io.mrc import StackWriter as StackWriter
from cryofire.io.mrc import open_stack as open_stack
from cryofire.io.mrc import read_stack_layout as read_stack_layout
from cryofire.io.mrc import read_volume as read_volume
from cryofire.io.mrc import stack_pixel_size as stack_pixel_size
from cryofire.io.mrc import write_volume as write_volume
from cryofire.io.particles import ImageSource as ImageSource
from cryofire.io.particles import read_particles as read_particles
from cryofire.io.particles import validate_table as validate_table
from cryofire.io.star import read_star as read_star
from cryofire.io.star import write_star as write_star
