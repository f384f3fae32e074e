"""sdpo.train"""
