"""The report a release is signed off on: Allure's HTML and the sign-off summary beside it.

    signoff.py   read allure-results (one directory per host), count board x phase, decide GO
                 or NO-GO by an explicit rule; write signoff.md and signoff.json
    generate.py  the real Allure report generator (installed by ``python3 dev.py setup`` from
                 the npm registry into .allure/) run on a masked copy of one or several results
                 directories; an earlier report's own files replaced, nothing else
    redact.py    secrets (the rigs' access keys...) masked in every form they travel in, in
                 text, bytes and streamed file copies: everything ``hil report`` writes

What goes into the results (steps, attachments, labels, environment.properties,
categories.json) is the pytest plugin's side; this package only reads them.
"""
