"""The arena: a CPU miniature of the paper's experiment (offline vs online vs humanline-offline).

``runner`` runs it (``humanline arena``); ``tasks`` holds the two synthetic tasks, ``reward_model`` the learned
reward model of the non-verifiable one, ``report`` the report writer. Import the submodules directly: this
package imports nothing heavy, so the CLI starts fast.
"""
