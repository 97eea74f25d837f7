"""The seed example from the MLRun tutorial, with only its import lines changed."""

import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from engine import NewRun, get_run_db, new_function
from producers.artifacts import PlotArtifact, TableArtifact


def handler(context, p1=1, p2='xx'):
    # access input metadata, values, and inputs
    print(f'Run: {context.name} (uid={context.uid})')
    print(f'Params: p1={p1}, p2={p2}')

    time.sleep(1)

    # log the run results (scalar values)
    context.log_result('accuracy', p1 * 2)
    context.log_result('loss', p1 * 3)

    # add a lable/tag to this run
    context.set_label('category', 'tests')

    # log a simple artifact + label the artifact
    context.log_artifact('model.txt', body=b'abc is 123', labels={'framework': 'xgboost'})

    # create a matplot figure and store as artifact
    fig, ax = plt.subplots()
    np.random.seed(0)
    x, y = np.random.normal(size=(2, 200))
    color, size = np.random.random((2, 200))
    ax.scatter(x, y, c=color, s=500 * size, alpha=0.3)
    ax.grid(color='lightgray', alpha=0.7)

    context.log_artifact(PlotArtifact('myfig', body=fig))

    # create a dataframe artifact
    df = pd.DataFrame([{'A':10, 'B':100}, {'A':11,'B':110}, {'A':12,'B':120}])
    context.log_artifact(TableArtifact('mydf.csv', df=df, visible=True))
    return 'my resp'


if __name__ == "__main__":
    secrets = Path(os.environ.get("RUNBUS_HOME", ".runbus")) / "secrets.txt"
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text("PASSWORD=1234\n")

    task = NewRun(handler=handler, name='demo', params={'p1': 5}).with_secrets('file', str(secrets)).set_label('type', 'demo')
    run = new_function().run(task)
    run.show()

    # run the same handler over three values of p1; the lowest loss wins (iteration 2, p1=2)
    task = NewRun(handler=handler).with_hyper_params({'p1': [5, 2, 3]}, 'min.loss')
    run = new_function().run(task)
    print(run.artifact('iteration_results').as_df().to_string(index=False))
    print(f"best iteration: {run.results['best_iteration']}")

    print(get_run_db().sql("SELECT r.name, r.iteration, k.key, k.value FROM runs r JOIN results k USING (uid) "
                           "WHERE r.iteration = 0 ORDER BY r.started_at, k.key").to_string(index=False))
