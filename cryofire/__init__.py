"""cryofire: amortized ab initio heterogeneous reconstruction for cryo-EM."""

__version__ = "0.1.0"
