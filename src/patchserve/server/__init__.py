"""patchserve.server"""
