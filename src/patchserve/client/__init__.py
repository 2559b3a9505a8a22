"""patchserve.client"""
