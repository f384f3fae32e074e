"""sdpo.profiling"""
