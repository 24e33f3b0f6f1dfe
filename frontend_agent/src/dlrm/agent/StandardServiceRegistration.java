package dlrm.agent;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;

/**
 * Makes TorchServe 0.12's ModelServer add {@link StandardInferenceService} to its gRPC inference
 * server. TorchServe offers no way to add a gRPC service: ModelServer.startGRPCServer builds the
 * server itself and adds its OIP service with
 *
 * <pre>builder.addService(ServerInterceptors.intercept(
 *         GRPCServiceFactory.getgRPCService(OPEN_INFERENCE_CONNECTOR), new GRPCInterceptor(connectorType)))</pre>
 *
 * <p>which compiles to "invokestatic ServerInterceptors.intercept(BindableService,
 * ServerInterceptor[]); invokevirtual ServerBuilder.addService(ServerServiceDefinition)". The
 * invokevirtual becomes "invokestatic StandardInferenceService.addService(ServerBuilder,
 * ServerServiceDefinition)", which takes the same two values from the stack and leaves the same
 * builder: same length, same stack, so no offset, stack map or other method changes. The method
 * reference it names is appended to the class's constant pool, which leaves every existing index
 * as it is. The class is left as it is, with a warning, unless that call sequence occurs exactly
 * once (tests/test_oip_grpc_standard.py checks the installed TorchServe through a real server).
 *
 * <p>Java only: this runs while ModelServer loads, before gRPC's classes may be loaded.
 */
final class StandardServiceRegistration {
    static final String TARGET = "org/pytorch/serve/ModelServer";

    private static final String INTERCEPT_OWNER = "io/grpc/ServerInterceptors";
    private static final String INTERCEPT = "intercept";
    private static final String INTERCEPT_TYPE =
            "(Lio/grpc/BindableService;[Lio/grpc/ServerInterceptor;)Lio/grpc/ServerServiceDefinition;";
    private static final String ADD_OWNER = "io/grpc/ServerBuilder";
    private static final String ADD = "addService";
    private static final String ADD_TYPE = "(Lio/grpc/ServerServiceDefinition;)Lio/grpc/ServerBuilder;";
    private static final String HOOK_OWNER = "dlrm/agent/StandardInferenceService";
    private static final String HOOK_TYPE =
            "(Lio/grpc/ServerBuilder;Lio/grpc/ServerServiceDefinition;)Lio/grpc/ServerBuilder;";

    private static final byte INVOKEVIRTUAL = (byte) 0xb6;
    private static final byte INVOKESTATIC = (byte) 0xb8;
    // Constant pool tags (JVM specification, section 4.4).
    private static final int UTF8 = 1;
    private static final int LONG = 5;
    private static final int DOUBLE = 6;
    private static final int CLASS = 7;
    private static final int METHODREF = 10;
    private static final int NAME_AND_TYPE = 12;
    // The constant pool's count and first entry, after magic and version.
    private static final int POOL_COUNT = 8;
    private static final int POOL_START = 10;
    private static final int MAX_POOL_COUNT = 0xffff;
    // The entries appended: the hook's class name, class, method name, method type, name and type, method.
    private static final int ADDED = 6;

    private StandardServiceRegistration() {}

    static byte[] patch(byte[] original) {
        Pool pool = new Pool(original);
        int intercept = pool.methodref(INTERCEPT_OWNER, INTERCEPT, INTERCEPT_TYPE);
        int add = pool.methodref(ADD_OWNER, ADD, ADD_TYPE);
        byte[] calls = {INVOKESTATIC, high(intercept), low(intercept), INVOKEVIRTUAL, high(add), low(add)};
        int at = intercept > 0 && add > 0 ? ClassBytes.indexOf(original, calls, pool.end) : -1;
        if (at < 0 || ClassBytes.indexOf(original, calls, at + 1) >= 0 || pool.count + ADDED > MAX_POOL_COUNT) {
            System.err.println(
                    "dlrm frontend agent: ModelServer's addService of TorchServe's OIP gRPC service not found "
                            + "exactly once; the standard inference.GRPCInferenceService is not served");
            return null;
        }
        // Appended entries, numbered from the pool's current count.
        int first = pool.count;
        ByteArrayOutputStream added = new ByteArrayOutputStream();
        utf8(added, HOOK_OWNER); // first
        u1u2(added, CLASS, first); // first + 1
        utf8(added, ADD); // first + 2
        utf8(added, HOOK_TYPE); // first + 3
        u1u2(added, NAME_AND_TYPE, first + 2);
        u2(added, first + 3); // first + 4
        u1u2(added, METHODREF, first + 1);
        u2(added, first + 4); // first + 5
        int hook = first + ADDED - 1;
        byte[] appended = added.toByteArray();

        byte[] patched = new byte[original.length + appended.length];
        System.arraycopy(original, 0, patched, 0, pool.end);
        System.arraycopy(appended, 0, patched, pool.end, appended.length);
        System.arraycopy(original, pool.end, patched, pool.end + appended.length, original.length - pool.end);
        patched[POOL_COUNT] = high(pool.count + ADDED);
        patched[POOL_COUNT + 1] = low(pool.count + ADDED);
        int call = at + appended.length + 3; // the invokevirtual, moved by the appended entries
        patched[call] = INVOKESTATIC;
        patched[call + 1] = high(hook);
        patched[call + 2] = low(hook);
        return patched;
    }

    /** Where each constant pool entry starts, and where the pool ends. */
    private static final class Pool {
        final byte[] bytes;
        final int count;
        final int[] offsets;
        final int end;

        Pool(byte[] bytes) {
            this.bytes = bytes;
            count = u2(bytes, POOL_COUNT);
            offsets = new int[count];
            int at = POOL_START;
            for (int index = 1; index < count; index++) {
                offsets[index] = at;
                int tag = bytes[at] & 0xff;
                at += 1 + switch (tag) {
                    case UTF8 -> 2 + u2(bytes, at + 1);
                    case CLASS, 8, 16, 19, 20 -> 2; // Class, String, MethodType, Module, Package
                    case 15 -> 3; // MethodHandle
                    case 3, 4, 9, METHODREF, 11, NAME_AND_TYPE, 17, 18 -> 4; // Integer ... InvokeDynamic
                    case LONG, DOUBLE -> 8;
                    default -> throw new IllegalArgumentException("unknown constant pool tag " + tag);
                };
                if (tag == LONG || tag == DOUBLE) {
                    index++; // these take two entries
                }
            }
            end = at;
        }

        /** The index of the Methodref owner.name:type, or -1. */
        int methodref(String owner, String name, String type) {
            for (int index = 1; index < count; index++) {
                int at = offsets[index];
                if (at == 0 || bytes[at] != METHODREF) {
                    continue;
                }
                int nameAndType = offsets[u2(bytes, at + 3)];
                if (utf8(u2(bytes, offsets[u2(bytes, at + 1)] + 1)).equals(owner)
                        && utf8(u2(bytes, nameAndType + 1)).equals(name)
                        && utf8(u2(bytes, nameAndType + 3)).equals(type)) {
                    return index;
                }
            }
            return -1;
        }

        /** An entry's text (the names and types compared here are ASCII, the same in modified UTF-8). */
        String utf8(int index) {
            int at = offsets[index];
            return new String(bytes, at + 3, u2(bytes, at + 1), StandardCharsets.UTF_8);
        }
    }

    private static int u2(byte[] bytes, int at) {
        return (bytes[at] & 0xff) << 8 | bytes[at + 1] & 0xff;
    }

    private static byte high(int value) {
        return (byte) (value >> 8);
    }

    private static byte low(int value) {
        return (byte) value;
    }

    private static void u2(ByteArrayOutputStream out, int value) {
        out.write(high(value));
        out.write(low(value));
    }

    private static void u1u2(ByteArrayOutputStream out, int tag, int value) {
        out.write(tag);
        u2(out, value);
    }

    private static void utf8(ByteArrayOutputStream out, String text) {
        byte[] bytes = text.getBytes(StandardCharsets.US_ASCII);
        u1u2(out, UTF8, bytes.length);
        out.write(bytes, 0, bytes.length);
    }
}
