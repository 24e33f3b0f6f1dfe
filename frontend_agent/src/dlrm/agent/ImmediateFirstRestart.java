package dlrm.agent;

import java.util.Arrays;

/**
 * TorchServe 0.12 restarts a dead worker after WorkerThread.BACK_OFF[n] seconds, n counting the
 * failures since it last loaded its model: {0, 1, 1, 2, 3, 5, 8, ...}, starting at n = 1. The
 * first restart of a worker that was serving (SIGKILLed, OOM-killed) therefore waits one second
 * before its process even starts, a third of this project's restart budget, and no setting
 * changes it. This patch makes that first wait 0: BACK_OFF[1] = 0. A worker that keeps dying
 * still backs off from its second restart on (1, 2, 3, 5, ... seconds), as TorchServe intends.
 *
 * <p>The array's initialiser in WorkerThread's static initialiser is the only place its values
 * exist: "bipush 18; newarray int; dup; iconst_0; iconst_0; iastore; dup; iconst_1; iconst_1;
 * iastore; ...". The second element's value (iconst_1) becomes iconst_0: one byte, same length,
 * same stack shape, so no offset, stack map or constant changes. The class is left as it is,
 * with a warning, unless that sequence occurs exactly once (tests/test_reliability.py checks
 * the installed TorchServe).
 */
final class ImmediateFirstRestart {
    static final String TARGET = "org/pytorch/serve/wlm/WorkerThread";

    private static final byte BIPUSH = 0x10;
    private static final byte NEWARRAY = (byte) 0xbc;
    private static final byte T_INT = 0x0a;
    private static final byte DUP = 0x59;
    private static final byte ICONST_0 = 0x03;
    private static final byte ICONST_1 = 0x04;
    private static final byte IASTORE = 0x4f;
    static final byte[] BACK_OFF_START = {
        BIPUSH, 18, NEWARRAY, T_INT,
        DUP, ICONST_0, ICONST_0, IASTORE,
        DUP, ICONST_1, ICONST_1, IASTORE,
    };
    // Where BACK_OFF[1]'s value is pushed, from the start of the sequence.
    private static final int FIRST_RETRY_VALUE = 10;

    private ImmediateFirstRestart() {}

    static byte[] patch(byte[] original) {
        int at = ClassBytes.indexOf(original, BACK_OFF_START, 0);
        if (at < 0 || ClassBytes.indexOf(original, BACK_OFF_START, at + 1) >= 0) {
            System.err.println(
                    "dlrm frontend agent: WorkerThread's BACK_OFF initialiser not found exactly once; "
                            + "dead workers restart after TorchServe's own back-off");
            return null;
        }
        byte[] patched = Arrays.copyOf(original, original.length);
        patched[at + FIRST_RETRY_VALUE] = ICONST_0;
        return patched;
    }
}
