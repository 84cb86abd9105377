"""Physics of image formation: transforms, lattices, rotations, CTF, shifts, projection.

Torch, batched, device-agnostic; knows nothing of files or networks. Conventions are fixed in
docs/conventions.md.
"""

from cryofire.physics.backprojection import (
    Backprojector as Backprojector,
    backproject_ft as backproject_ft,
    reconstruct_from_sums as reconstruct_from_sums,
)
from cryofire.physics.fast_insert import FastInserter as FastInserter
from cryofire.physics.ctf import (
    compute_ctf as compute_ctf,
    ctf_from_parameters as ctf_from_parameters,
    ctf_for_images as ctf_for_images,
    electron_wavelength_angstrom as electron_wavelength_angstrom,
)
from cryofire.physics.fft import (
    downsample_images as downsample_images,
    downsample_volume as downsample_volume,
    fft2_centered as fft2_centered,
    fft3_centered as fft3_centered,
    fourier_crop2 as fourier_crop2,
    hartley2 as hartley2,
    hartley3 as hartley3,
    ifft2_centered as ifft2_centered,
    ifft3_centered as ifft3_centered,
    ihartley2 as ihartley2,
    ihartley3 as ihartley3,
)
from cryofire.physics.fsc import (
    fourier_shell_correlation as fourier_shell_correlation,
    resolution_at as resolution_at,
)
from cryofire.physics.inplane import (
    inplane_rotation_matrix as inplane_rotation_matrix,
    rotate_images as rotate_images,
)
from cryofire.physics.lattice import (
    circular_mask as circular_mask,
    crop_centered as crop_centered,
    frequency_grid_2d as frequency_grid_2d,
    frequency_grid_3d as frequency_grid_3d,
    pad_centered as pad_centered,
    radial_frequency_px as radial_frequency_px,
    real_space_disk_mask as real_space_disk_mask,
    soft_circular_window as soft_circular_window,
)
from cryofire.physics.projection import (
    project_volume as project_volume,
    slice_coordinates_px as slice_coordinates_px,
    slice_volume_ft as slice_volume_ft,
    trilinear_gridding_kernel as trilinear_gridding_kernel,
)
from cryofire.physics.rotations import (
    axis_angle_to_matrix as axis_angle_to_matrix,
    euler_to_matrix as euler_to_matrix,
    geodesic_distance_deg as geodesic_distance_deg,
    matrix_to_euler as matrix_to_euler,
    matrix_to_quaternion as matrix_to_quaternion,
    matrix_to_s2s2 as matrix_to_s2s2,
    quaternion_to_matrix as quaternion_to_matrix,
    random_rotations as random_rotations,
    s2s2_to_matrix as s2s2_to_matrix,
)
from cryofire.physics.shifts import (
    hartley_shift_2d as hartley_shift_2d,
    phase_shift_2d as phase_shift_2d,
    shift_images as shift_images,
)
