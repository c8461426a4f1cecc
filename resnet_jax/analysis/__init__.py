"""Gradient-theory analyses of any model of the zoo, at initialisation or from a checkpoint.

- `blocks`: every residual block as a function of its own input (y, F, shortcut), captured from the model.
- `jacobians`: block Jacobians exact and matrix-free, the I + dF/dh identities, the chain rule, end-to-end spectra.
- `gradflow`: norms of the loss gradient per block and per layer, along training.
- `paths`: path-length distribution and the gradient each path length carries (Veit et al. 2016).
- `lesion`: test error after deleting or reordering blocks.
- `landscape`: the loss along filter-normalised random directions (Li et al. 2018).
- `degradation`: plain against residual nets of several depths, trained with one recipe (He et al. 2015).
- `cka`: linear CKA between block outputs, minibatch (Nguyen et al. 2021), and each branch against its skip.
- `hessian`: the loss Hessian's top eigenvalues, trace and eigenvalue density (Lanczos, Hutchinson, SLQ).
- `trajectory`: a run's path in its PCA plane over the loss (Li et al. 2018), and interpolation of solutions.
- `feature_maps`: every stage's output as images, channel means and the most active channels.
- `common`: model snapshots (init or checkpoint), real image batches, JSON/CSV/PNG output.
- `interception`: the one way the analyses record or rewrite a block's parts (branch, skip) in a forward pass.
- `tools`: the table of analysis tools (options, run, report section) that the command line is built from;
  its docstring is the recipe for adding one.
- `cli`: ``resnet-jax analyze TOOL|all``; `report`: the page of ``analyze all``.

The modules are imported on use (``from resnet_jax.analysis.jacobians import analyze_jacobians``), so
that the ``resnet-jax`` command line loads none of them until an analysis runs.
"""
