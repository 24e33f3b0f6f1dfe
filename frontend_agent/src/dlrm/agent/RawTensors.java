package dlrm.agent;

import com.google.protobuf.ByteString;
import io.grpc.Status;
import io.grpc.StatusException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.List;
import java.util.Map;
import java.util.function.BiConsumer;
import java.util.function.Function;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.InferTensorContents;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest.InferInputTensor;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;

/**
 * Tensor contents between the standard gRPC clients and TorchServe's OIP service.
 *
 * <p>Standard clients (tritonclient.grpc always, KServe's optionally) send each input's elements
 * as bytes in raw_input_contents, and tritonclient.grpc reads outputs only from
 * raw_output_contents. TorchServe 0.12's ModelInfer reads only the typed contents fields and
 * writes only those. Requests are therefore converted to typed contents (each raw tensor checked
 * against its datatype and shape first: INVALID_ARGUMENT otherwise, nothing guessed), and
 * responses to raw contents, as Triton itself answers. Elements are little-endian; a BYTES
 * element is a 4-byte little-endian length and its bytes (the protocol's layout).
 */
final class RawTensors {

    /** A fixed-size datatype: its element size, one element read into typed contents, typed contents written. */
    private record Datatype(
            int size,
            BiConsumer<ByteBuffer, InferTensorContents.Builder> read,
            Function<InferTensorContents, List<? extends Number>> values,
            BiConsumer<ByteBuffer, Number> write) {}

    // Every fixed-size datatype that TorchServe's ModelInfer passes on to a handler, in the typed field it reads.
    private static final Map<String, Datatype> DATATYPES = Map.ofEntries(
            Map.entry("INT8", new Datatype(1, (in, out) -> out.addIntContents(in.get()),
                    InferTensorContents::getIntContentsList, (out, v) -> out.put(v.byteValue()))),
            Map.entry("INT16", new Datatype(2, (in, out) -> out.addIntContents(in.getShort()),
                    InferTensorContents::getIntContentsList, (out, v) -> out.putShort(v.shortValue()))),
            Map.entry("INT32", new Datatype(4, (in, out) -> out.addIntContents(in.getInt()),
                    InferTensorContents::getIntContentsList, (out, v) -> out.putInt(v.intValue()))),
            Map.entry("INT64", new Datatype(8, (in, out) -> out.addInt64Contents(in.getLong()),
                    InferTensorContents::getInt64ContentsList, (out, v) -> out.putLong(v.longValue()))),
            Map.entry("UINT8", new Datatype(1, (in, out) -> out.addUintContents(Byte.toUnsignedInt(in.get())),
                    InferTensorContents::getUintContentsList, (out, v) -> out.put(v.byteValue()))),
            Map.entry("UINT16", new Datatype(2, (in, out) -> out.addUintContents(Short.toUnsignedInt(in.getShort())),
                    InferTensorContents::getUintContentsList, (out, v) -> out.putShort(v.shortValue()))),
            Map.entry("UINT32", new Datatype(4, (in, out) -> out.addUintContents(in.getInt()),
                    InferTensorContents::getUintContentsList, (out, v) -> out.putInt(v.intValue()))),
            Map.entry("UINT64", new Datatype(8, (in, out) -> out.addUint64Contents(in.getLong()),
                    InferTensorContents::getUint64ContentsList, (out, v) -> out.putLong(v.longValue()))),
            Map.entry("FP32", new Datatype(4, (in, out) -> out.addFp32Contents(in.getFloat()),
                    InferTensorContents::getFp32ContentsList, (out, v) -> out.putFloat(v.floatValue()))),
            Map.entry("FP64", new Datatype(8, (in, out) -> out.addFp64Contents(in.getDouble()),
                    InferTensorContents::getFp64ContentsList, (out, v) -> out.putDouble(v.doubleValue()))));

    private RawTensors() {}

    /** The request with its raw_input_contents moved into its inputs' typed contents; as it is without raw contents. */
    static ModelInferRequest typedInputs(ModelInferRequest request) throws StatusException {
        int count = request.getRawInputContentsCount();
        if (count == 0) {
            return request;
        }
        if (count != request.getInputsCount()) {
            throw invalid("raw_input_contents holds " + count + " tensors for " + request.getInputsCount()
                    + " inputs: with raw contents, every input has its raw tensor");
        }
        ModelInferRequest.Builder typed = request.toBuilder().clearRawInputContents();
        for (int index = 0; index < count; index++) {
            InferInputTensor input = request.getInputs(index);
            if (input.hasContents()) {
                throw invalid("input " + input.getName() + " has both contents and raw_input_contents");
            }
            ByteBuffer raw = request.getRawInputContents(index).asReadOnlyByteBuffer().order(ByteOrder.LITTLE_ENDIAN);
            typed.getInputsBuilder(index).setContents(typedContents(input, elements(input), raw));
        }
        return typed.build();
    }

    private static InferTensorContents typedContents(InferInputTensor input, long elements, ByteBuffer raw)
            throws StatusException {
        String name = input.getName();
        InferTensorContents.Builder contents = InferTensorContents.newBuilder();
        if ("BOOL".equals(input.getDatatype())) {
            checkSize(name, raw, elements, 1);
            while (raw.hasRemaining()) {
                byte value = raw.get();
                if (value != 0 && value != 1) {
                    throw invalid("input " + name + ": a BOOL element is the byte 0 or 1, got " + value);
                }
                contents.addBoolContents(value == 1);
            }
        } else if ("BYTES".equals(input.getDatatype())) {
            for (long element = 0; element < elements; element++) {
                int length = raw.remaining() >= Integer.BYTES ? raw.getInt() : -1;
                if (length < 0 || length > raw.remaining()) {
                    throw invalid("input " + name + ": raw BYTES contents end inside element " + element + " of "
                            + elements + " (each is a 4-byte little-endian length and that many bytes)");
                }
                contents.addBytesContents(ByteString.copyFrom(raw.slice(raw.position(), length)));
                raw.position(raw.position() + length);
            }
            if (raw.hasRemaining()) {
                throw invalid("input " + name + ": " + raw.remaining() + " bytes of raw BYTES contents after its "
                        + elements + " elements");
            }
        } else {
            Datatype datatype = DATATYPES.get(input.getDatatype());
            if (datatype == null) {
                throw invalid("input " + name + ": datatype " + input.getDatatype() + " is not served in raw contents");
            }
            checkSize(name, raw, elements, datatype.size());
            while (raw.hasRemaining()) {
                datatype.read().accept(raw, contents);
            }
        }
        return contents.build();
    }

    /** The number of elements the input's shape holds. */
    private static long elements(InferInputTensor input) throws StatusException {
        long elements = 1;
        for (long dimension : input.getShapeList()) {
            if (dimension < 0) {
                throw invalid("input " + input.getName() + " has shape " + input.getShapeList()
                        + ": a dimension is never negative");
            }
            try {
                elements = Math.multiplyExact(elements, dimension);
            } catch (ArithmeticException e) {
                throw invalid("input " + input.getName() + " has shape " + input.getShapeList()
                        + ": more elements than any request holds");
            }
        }
        return elements;
    }

    private static void checkSize(String name, ByteBuffer raw, long elements, int size) throws StatusException {
        if (raw.remaining() % size != 0 || raw.remaining() / size != elements) {
            throw invalid("input " + name + " has " + raw.remaining() + " bytes of raw contents; its shape holds "
                    + elements + " elements of " + size + " bytes");
        }
    }

    /** The response with every output's typed contents moved into raw_output_contents. */
    static ModelInferResponse rawOutputs(ModelInferResponse response) {
        ModelInferResponse.Builder raw = response.toBuilder();
        for (int index = 0; index < response.getOutputsCount(); index++) {
            ModelInferResponse.InferOutputTensor output = response.getOutputs(index);
            raw.addRawOutputContents(rawContents(output.getDatatype(), output.getContents()));
            raw.getOutputsBuilder(index).clearContents();
        }
        return raw.build();
    }

    private static ByteString rawContents(String datatype, InferTensorContents contents) {
        if ("BOOL".equals(datatype)) {
            byte[] bytes = new byte[contents.getBoolContentsCount()];
            for (int index = 0; index < bytes.length; index++) {
                bytes[index] = (byte) (contents.getBoolContents(index) ? 1 : 0);
            }
            return ByteString.copyFrom(bytes);
        }
        if ("BYTES".equals(datatype)) {
            ByteString.Output out = ByteString.newOutput();
            ByteBuffer length = ByteBuffer.allocate(Integer.BYTES).order(ByteOrder.LITTLE_ENDIAN);
            for (ByteString element : contents.getBytesContentsList()) {
                out.write(length.putInt(0, element.size()).array(), 0, Integer.BYTES);
                out.write(element.toByteArray(), 0, element.size());
            }
            return out.toByteString();
        }
        Datatype type = DATATYPES.get(datatype);
        if (type == null) { // TorchServe writes no contents for any other datatype
            return ByteString.EMPTY;
        }
        List<? extends Number> values = type.values().apply(contents);
        ByteBuffer out = ByteBuffer.allocate(values.size() * type.size()).order(ByteOrder.LITTLE_ENDIAN);
        values.forEach(value -> type.write().accept(out, value));
        return ByteString.copyFrom(out.array());
    }

    private static StatusException invalid(String message) {
        return Status.INVALID_ARGUMENT.withDescription(message).asException();
    }
}
