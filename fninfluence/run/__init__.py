"""The run shell: the imperative code that drives the pure core over the user's data.

- :mod:`.options`: the public keywords parsed into frozen records (how to run, how to cut and keep the work,
  which scores);
- :mod:`.loop`: the one loop over a data slice's batches (:func:`~.loop.run_pass`);
- :mod:`.discovery`: the tap of a call, discovered once; :mod:`.slices`: the data's length and slices;
- :mod:`.cells`: where each cell's result goes (memory, a store, ranks) and how cells become one result;
- :mod:`.fit`, :mod:`.queries`, :mod:`.score`: fitting passes, query gradients, score kinds;
- :mod:`.ranks`: torch.distributed ranks and the collectives of the reductions.

See docs/architecture.md for one call's data flow.
"""
