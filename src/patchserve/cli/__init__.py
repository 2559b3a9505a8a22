"""patchserve.cli"""
