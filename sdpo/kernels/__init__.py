"""sdpo.kernels"""
