"""patchserve.engine"""
